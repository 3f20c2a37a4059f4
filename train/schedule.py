"""Learning-rate schedules as pure functions of training progress, applied every optimizer step.

A schedule maps progress ``t`` (in epochs, fractional: ``step / steps_per_epoch``) to a multiplier of the
peak lr. Being pure functions of the step counter, they need no state beyond that counter: resuming sets
the step and the lr follows exactly, and ``curves.png`` redraws the whole lr curve from the same function.

All three share a linear warmup from ``warmup_start * lr`` to ``lr`` over ``warmup_epochs``:

* ``multistep``: ``gamma ** (number of milestones <= t)`` (the paper's /10 at epochs 150 and 250);
* ``cosine``: half-cosine from 1 after warmup to ``final_lr_ratio`` at the last step;
* ``onecycle``: linear rise during warmup, then linear fall to ``final_lr_ratio`` (the triangular one-cycle
  of fast CIFAR-10 recipes, e.g. Page's and Keller Jordan's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from rankshard.train.config import TrainConfig


@dataclass(frozen=True)
class Schedule:
    """The lr of every optimizer step of a run."""

    cfg: TrainConfig
    steps_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.cfg.epochs * self.steps_per_epoch

    def peak_lr(self) -> float:
        """``lr``, rescaled linearly when it is given per ``lr_reference_batch`` images."""
        cfg = self.cfg
        return cfg.lr * cfg.batch_size / cfg.lr_reference_batch if cfg.lr_reference_batch else cfg.lr

    def multiplier(self, step: int) -> float:
        """Factor of the peak lr used by optimizer step ``step`` (0-based)."""
        t = step / self.steps_per_epoch  # epochs done before this step
        warm = self.cfg.warmup_epochs
        if warm > 0 and t < warm:
            return self.cfg.warmup_start + (1 - self.cfg.warmup_start) * t / warm
        return DECAYS[self.cfg.schedule](self.cfg, t, self.total_steps / self.steps_per_epoch)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step``."""
        return self.peak_lr() * self.multiplier(step)


def _multistep(cfg: TrainConfig, t: float, total: float) -> float:
    return cfg.gamma ** sum(1 for m in cfg.milestones if t >= m)


def _decay_fraction(cfg: TrainConfig, t: float, total: float) -> float:
    """Share of the post-warmup phase done at ``t``, in [0, 1] (1 at the last step)."""
    span = total - cfg.warmup_epochs
    return min(1.0, max(0.0, (t - cfg.warmup_epochs) / span)) if span > 0 else 1.0


def _cosine(cfg: TrainConfig, t: float, total: float) -> float:
    u = _decay_fraction(cfg, t, total)
    return cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * u))


def _onecycle(cfg: TrainConfig, t: float, total: float) -> float:
    u = _decay_fraction(cfg, t, total)
    return 1 + (cfg.final_lr_ratio - 1) * u


DECAYS: dict[str, Callable[[TrainConfig, float, float], float]] = {
    "multistep": _multistep, "cosine": _cosine, "onecycle": _onecycle,
}
