"""Saliency maps of several methods for a batch of images: the layer between the math and the CLI.

``compute_maps`` runs every requested method (names from ``METHODS``) on every image, decomposing the batch
once for the rank-based methods, and returns reduced ``[N, H, W]`` float32 maps per method plus the
explained classes and the rank-path convergence deltas.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from rankshard.preprocess.rank.engine import Decomposition, RankEngine

from rankshard.evaluate.rig.attribution import (REDUCTIONS, IGConfig, SmoothGradConfig, integrated_gradients, predicted_class,
                          reduce_channels, smoothgrad, vanilla_gradient)
from rankshard.evaluate.rig.rank_ig import RankPathConfig, RankPathResult, RIGConfig, rank_path, rig


@dataclass(frozen=True)
class MapConfig:
    """Which methods to run and how; ``rig.output``/``rig.reduction`` apply to every method."""

    methods: tuple[str, ...] = ("vanilla", "rig")
    rig: RIGConfig = field(default_factory=RIGConfig)
    ig: IGConfig = field(default_factory=IGConfig)
    smoothgrad: SmoothGradConfig = field(default_factory=SmoothGradConfig)
    rank_path_rule: str = "left"
    rank_path_steps: int = 1

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown or no attribution methods {unknown}; choose from {sorted(METHODS)}")

    @property
    def rank_path(self) -> RankPathConfig:
        r = self.rig
        return RankPathConfig(r.output, r.stride, self.rank_path_rule, self.rank_path_steps, r.batch_size)


@dataclass
class _Job:
    """One image's context handed to every method."""

    model: nn.Module
    x: torch.Tensor
    target: int
    cfg: MapConfig
    engine: RankEngine
    dec: Decomposition | None
    notes: dict


def _rig(job: _Job) -> torch.Tensor:
    return rig(job.model, job.x, job.cfg.rig, job.engine, job.target, job.dec).map


def _rank_path(job: _Job) -> torch.Tensor:
    res: RankPathResult = rank_path(job.model, job.x, job.cfg.rank_path, job.engine, job.target, job.dec)
    job.notes["rank_path"] = {"delta": res.delta, "relative_delta": res.relative_delta, "f_x": res.f_x,
                              "f_0": res.f_0, "sum": float(res.per_channel.sum()), "knots": len(res.knots)}
    return reduce_channels(res.per_channel, job.cfg.rig.reduction)


def _vanilla(job: _Job) -> torch.Tensor:
    return reduce_channels(vanilla_gradient(job.model, job.x, job.target, job.cfg.rig.output), job.cfg.rig.reduction)


def _ig(job: _Job) -> torch.Tensor:
    attr = integrated_gradients(job.model, job.x, job.target, job.cfg.ig, job.cfg.rig.output, job.cfg.rig.batch_size)
    return reduce_channels(attr, job.cfg.rig.reduction)


def _smoothgrad(job: _Job) -> torch.Tensor:
    g = smoothgrad(job.model, job.x, job.target, job.cfg.smoothgrad, job.cfg.rig.output, job.cfg.rig.batch_size)
    return reduce_channels(g, job.cfg.rig.reduction)


METHODS: dict[str, Callable[[_Job], torch.Tensor]] = {
    "vanilla": _vanilla, "rig": _rig, "ig": _ig, "smoothgrad": _smoothgrad, "rank-path": _rank_path,
}
RANK_METHODS = frozenset({"rig", "rank-path"})  # methods that need the image's decomposition
TITLES = {"vanilla": "vanilla gradient", "rig": "RIG", "ig": "Integrated Gradients", "smoothgrad": "SmoothGrad",
          "rank-path": "rank path"}


@dataclass
class MapSet:
    """Maps ``{method: [N, H, W] float32}``, explained ``targets [N]`` and per-image notes (rank-path delta)."""

    maps: dict[str, np.ndarray]
    targets: list[int]
    notes: list[dict]


def compute_maps(model: nn.Module, images: torch.Tensor, cfg: MapConfig, engine: RankEngine,
                 targets: list[int] | None = None, decs: Decomposition | None = None,
                 on_image: Callable[[], None] | None = None) -> MapSet:
    """Every method of ``cfg`` on every image of ``images [N, C, H, W]`` (on the model's device).

    ``targets`` default to each image's full-rank prediction. ``decs`` is ``engine.decompose(images)``;
    when a rank method is asked for and it is not given, the batch is decomposed here (once).
    ``on_image`` is called after each image (progress: one image's maps take seconds on a CPU).
    """
    if cfg.rig.reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {cfg.rig.reduction!r}")
    if decs is None and RANK_METHODS & set(cfg.methods):
        decs = engine.decompose(images)
    out = {m: [] for m in cfg.methods}
    chosen, notes = [], []
    for i, x in enumerate(images):
        target = predicted_class(model, x) if targets is None else int(targets[i])
        dec = None if decs is None else Decomposition(*(t[i] for t in decs))
        job = _Job(model, x, target, cfg, engine, dec, {})
        for m in cfg.methods:
            out[m].append(METHODS[m](job).detach().float().cpu().numpy())
        chosen.append(target)
        notes.append(job.notes)
        if on_image is not None:
            on_image()
    return MapSet({m: np.stack(v) for m, v in out.items()}, chosen, notes)
