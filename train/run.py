"""One process of a training run: join the process group, prepare the run folder, train, leave.

Kept apart from the CLI (which only parses) so tests and notebooks can start a run with a ``TrainConfig``
and, optionally, an in-memory ``TrainData``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from rankshard.train import rundir
from rankshard.train.config import ConfigError, TrainConfig
from rankshard.train.data import ShardData, TrainData
from rankshard.train.dist import DistEnv, all_reduce_sum, init_distributed, shutdown
from rankshard.train.trainer import Trainer, TrainingStopped


def _main_then_agree(env: DistEnv, fn: Callable[[], None]) -> None:
    """Run ``fn`` on rank 0 and make every rank raise if it failed (instead of hanging in a collective)."""
    error: Exception | None = None
    if env.is_main:
        try:
            fn()
        except ConfigError as exc:
            error = exc
    failed = all_reduce_sum(torch.tensor([float(error is not None)], device=env.device), env)
    if error is not None:
        raise error
    if failed.item() > 0:
        raise ConfigError("rank 0 refused the run folder (its message says why)")


def run(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        stop_after_epochs: int | None = None, data: TrainData | None = None,
        env: DistEnv | None = None, log: Callable[[str], None] = print,
        handle_signals: bool = False, progress: bool = True, resume_from: str | None = None) -> list[dict[str, Any]]:
    """Train ``cfg`` into ``run_dir`` (``resume``: continue from its last.pt); returns this call's epoch records.

    Under torchrun every process calls this; rank 0 writes the folder, all ranks train. ``data`` defaults
    to the shards named by ``cfg`` (``ShardData``). ``handle_signals`` (the CLI): SIGTERM/SIGUSR1 save
    last.pt at the next check and stop (``TrainingStopped``, exit 75), so a preempted job resumes exactly.
    ``progress=False`` drops the per-step progress lines (``--quiet``). ``resume_from``: resume from this
    checkpoint of the run folder (e.g. last.prev.pt when last.pt is damaged) instead of last.pt.
    """
    own_env = env is None
    env = env or init_distributed(cfg.device)
    run_dir = Path(run_dir)
    try:
        if env.is_main:
            log("config " + json.dumps(cfg.to_json(), sort_keys=True))
        _main_then_agree(env, lambda: rundir.prepare(run_dir, cfg, overwrite=overwrite, resume=resume,
                                                       resume_from=resume_from))
        trainer = Trainer(cfg, run_dir, data if data is not None else ShardData(cfg), env, log, progress)
        if resume:
            trainer.resume(resume_from)
        if handle_signals:
            trainer.install_signal_handlers()
        if env.is_main:
            rundir.clear_stopped(run_dir)  # this call carries the run on: an earlier stop is over
        records = trainer.fit(stop_after_epochs=stop_after_epochs)
        if trainer.stopped:
            if env.is_main:
                rundir.mark_stopped(run_dir, trainer.epoch, trainer.step)
            raise TrainingStopped(f"stopped by a signal in epoch {trainer.epoch + 1} at step {trainer.step}, "
                                  f"{run_dir / 'last.pt'} saved; continue with --resume {run_dir}")
        if env.is_main and trainer.epoch >= cfg.epochs:
            log(f"done: best {cfg.test_variant} top-1 {100 * trainer.best_top1:.2f}% -> {run_dir / 'best.pt'}")
        return records
    finally:
        if own_env:
            shutdown(env)
