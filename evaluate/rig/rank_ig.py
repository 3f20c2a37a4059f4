"""Rank Integrated Gradients (RIG, the paper's Eq. 3) and a completeness-preserving rank-path variant.

For an image ``x`` (C x H x W in [0, 1], n = min(H, W)) with low-rank versions ``x_k`` (SPEC rank semantics):

    RIG(x) = sum_{k=1..n} ((n - k) / n) * R(g_k),   g_k = d f_i(x_k) / d x_k

where ``f_i`` is the softmax probability (or logit) of the class ``i`` predicted on the full-rank image and
``R`` reduces the colour channels (max of |.| by default). As in the paper, each rank's gradient is reduced
before the weighted sum. Low ranks weigh most: rank 1 gets (n-1)/n, rank n gets 0 (so it is never computed).

Rank stride ``s`` evaluates only k = 1, 1+s, 1+2s, ... and lets each evaluated rank stand for the block
k .. k+s-1 it starts: its weight is the sum of the block's weights, ``sum_{j=k}^{min(k+s-1, n)} (n-j)/n``.
The total weight thus stays (n-1)/2 as at stride 1, and stride 1 gives Eq. 3 exactly.

Rank path (``rank_path``): the path integral of grad f along the piecewise-linear path 0 = x_0 -> x_1 ->
... -> x_n = x, i.e. ``sum_k grad f(x_k) * (x_{k+1} - x_k)`` with the default left rule and one step per
segment (SPEC). By the fundamental theorem of calculus its attributions sum to ``f(x) - f(x_0)`` as the
quadrature gets exact (finer ``steps``, or ``trapezoid``, which is exact when f is quadratic along each
segment); the convergence delta ``sum(attr) - (f(x) - f(x_0))`` says how far off a given setting is.

All of an image's ranks come from ONE decomposition (``RankEngine.decompose``) and go through the model
``batch_size`` at a time, one backward pass per batch (see ``attribution.batched_gradients``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rankshard.preprocess.rank.engine import Decomposition, RankEngine

from rankshard.evaluate.rig.attribution import (OUTPUTS, REDUCTIONS, RULES, batched_gradients, model_output, path_integral,
                          predicted_class, quadrature)


@dataclass(frozen=True)
class RIGConfig:
    """RIG options: explained ``output`` (prob|logit), channel ``reduction``, rank ``stride``, ``batch_size``
    (ranks per forward/backward pass)."""

    output: str = "prob"
    reduction: str = "max-abs"
    stride: int = 1
    batch_size: int = 64

    def __post_init__(self) -> None:
        for name, table, what in ((self.output, OUTPUTS, "output"), (self.reduction, REDUCTIONS, "reduction")):
            if name not in table:
                raise ValueError(f"unknown {what} {name!r}; choose one of {sorted(table)}")
        if self.stride < 1 or self.batch_size < 1:
            raise ValueError(f"stride and batch_size must be >= 1, got {self.stride}, {self.batch_size}")


@dataclass(frozen=True)
class RankPathConfig:
    """Rank-path options: ``output``, rank ``stride`` (knots 0, s, 2s, ..., n), quadrature ``rule`` and
    ``steps`` per segment (left/1 = SPEC's sum), ``batch_size``."""

    output: str = "prob"
    stride: int = 1
    rule: str = "left"
    steps: int = 1
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown output {self.output!r}; choose one of {sorted(OUTPUTS)}")
        if self.rule not in RULES:
            raise ValueError(f"unknown quadrature rule {self.rule!r}; choose one of {sorted(RULES)}")
        if self.stride < 1 or self.batch_size < 1:
            raise ValueError(f"stride and batch_size must be >= 1, got {self.stride}, {self.batch_size}")
        quadrature(self.rule, self.steps)


@dataclass
class RIGResult:
    """One image's RIG: ``map [H, W]`` (Eq. 3), ``per_channel [C, H, W]`` (the weighted sum of unreduced
    gradients), the explained class, the evaluated ranks with their weights and the output f(x_k) at each."""

    map: torch.Tensor
    per_channel: torch.Tensor
    target: int
    ranks: list[int]
    weights: list[float]
    values: list[float]


@dataclass
class RankPathResult:
    """One image's rank-path attribution ``per_channel [C, H, W]``, its knots, f(x), f(x_0) and the delta."""

    per_channel: torch.Tensor
    target: int
    knots: list[int]
    f_x: float
    f_0: float

    @property
    def delta(self) -> float:
        """Convergence delta ``sum(attr) - (f(x) - f(x_0))``; 0 for an exact path integral."""
        return float(self.per_channel.sum()) - (self.f_x - self.f_0)

    @property
    def relative_delta(self) -> float:
        """``|delta| / |f(x) - f(x_0)|`` (inf when the two outputs are equal but the attributions are not)."""
        gap = abs(self.f_x - self.f_0)
        return abs(self.delta) / gap if gap > 0 else (0.0 if self.delta == 0 else float("inf"))


def rig_ranks(n: int, stride: int = 1) -> tuple[list[int], np.ndarray]:
    """Evaluated ranks and their float64 weights for an image with n = min(H, W) (see the module doc).

    Ranks whose weight is 0 (k = n) are left out: they cannot change the sum.
    """
    if n < 1 or stride < 1:
        raise ValueError(f"need n >= 1 and stride >= 1, got n={n}, stride={stride}")
    ranks, weights = [], []
    for k in range(1, n + 1, stride):
        w = sum((n - j) / n for j in range(k, min(k + stride - 1, n) + 1))
        if w > 0:
            ranks.append(k)
            weights.append(w)
    return ranks, np.asarray(weights, dtype=np.float64)


def rank_images(engine: RankEngine, x: torch.Tensor, ranks: list[int], dec: Decomposition | None = None
                ) -> torch.Tensor:
    """``[len(ranks), C, H, W]`` low-rank versions of ``x [C, H, W]`` in x's dtype, from one decomposition.

    Rank 0 is zeros and rank >= n is ``x`` itself (not its float32 reconstruction), so path endpoints are exact.
    """
    n = min(x.shape[-2:])
    dec = engine.decompose(x) if dec is None else dec
    inner = [k for k in ranks if 0 < k < n]
    built = engine.reconstruct(dec, inner) if inner else {}

    def pick(k: int) -> torch.Tensor:
        if k == 0:
            return torch.zeros_like(x)
        return x if k >= n else built[k].to(x.dtype)

    return torch.stack([pick(k) for k in ranks])


def rig(model: nn.Module, x: torch.Tensor, cfg: RIGConfig = RIGConfig(), engine: RankEngine | None = None,
        target: int | None = None, dec: Decomposition | None = None) -> RIGResult:
    """RIG (Eq. 3) of one image ``x [C, H, W]`` in [0, 1]; ``target`` defaults to the full-rank prediction.

    ``engine`` (default: a CPU/auto ``RankEngine``) decomposes ``x`` once unless ``dec`` (its decomposition)
    is given; all ranks then go through the model ``cfg.batch_size`` at a time.
    """
    engine = engine or RankEngine(device=x.device)
    target = predicted_class(model, x) if target is None else int(target)
    ranks, weights = rig_ranks(min(x.shape[-2:]), cfg.stride)
    xs = rank_images(engine, x, ranks, dec)
    w = torch.as_tensor(weights, dtype=x.dtype, device=x.device)
    reduce = REDUCTIONS[cfg.reduction]
    rig_map = torch.zeros(x.shape[-2:], dtype=x.dtype, device=x.device)
    per_channel, values, lo = torch.zeros_like(x), [], 0
    for grads, vals in batched_gradients(model, xs, target, cfg.output, cfg.batch_size):
        wb = w[lo:lo + len(grads)]
        rig_map += (wb[:, None, None] * reduce(grads)).sum(dim=0)  # reduce each rank's gradient, then weigh
        per_channel += (wb[:, None, None, None] * grads).sum(dim=0)
        values += vals.tolist()
        lo += len(grads)
    return RIGResult(rig_map, per_channel, target, ranks, weights.tolist(), values)


def path_knots(n: int, stride: int = 1) -> list[int]:
    """Ranks 0 = k_0 < k_1 < ... < k_m = n visited by the rank path with the given stride."""
    if n < 1 or stride < 1:
        raise ValueError(f"need n >= 1 and stride >= 1, got n={n}, stride={stride}")
    return list(range(0, n, stride)) + [n]


def rank_path(model: nn.Module, x: torch.Tensor, cfg: RankPathConfig = RankPathConfig(),
              engine: RankEngine | None = None, target: int | None = None, dec: Decomposition | None = None
              ) -> RankPathResult:
    """Completeness-preserving rank-path attribution of ``x [C, H, W]`` (per channel) with its delta."""
    engine = engine or RankEngine(device=x.device)
    target = predicted_class(model, x) if target is None else int(target)
    knots = path_knots(min(x.shape[-2:]), cfg.stride)
    xs = rank_images(engine, x, knots, dec)
    attr = path_integral(model, xs[:-1], xs[1:], target, cfg.output, cfg.rule, cfg.steps, cfg.batch_size)
    with torch.no_grad():
        f_ends = model_output(model, torch.stack([x, torch.zeros_like(x)]), target, cfg.output)
    return RankPathResult(attr, target, knots, float(f_ends[0]), float(f_ends[1]))
