"""The one checkpoint loader of ``rankshard-evaluate``: ``[NAME=]PATH`` parsing, loading, and fit checks.

Every subcommand (accuracy, spectrum, pgd, rig, weights, svd-profile) loads through ``load_checkpoints``, so
names, ``--trust-checkpoint`` (full unpickling only when asked) and error messages are the same everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankshard.train.checkpoint import model_from_checkpoint

from rankshard.evaluate.data import EvalData
from rankshard.evaluate.errors import EvaluationError


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model in eval mode on its device, with what the tables show about it."""

    name: str            # column/legend label: NAME from NAME=PATH, else the file stem (made unique)
    path: str
    model: nn.Module
    num_classes: int
    input_size: int | None
    trained_on: str      # payload data.train_variant when recorded (e.g. rank-010), else "?"
    payload: dict[str, Any] = field(default_factory=dict, repr=False)  # arch, variant, config... as stored


def split_names(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``["natural=a.pt", "runs/b/ckpt.pt"]`` -> ``[("natural", "a.pt"), ("b-ckpt", ...)]``; names unique."""
    pairs = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        pairs.append((name, path) if sep and name and not Path(spec).exists() else (Path(spec).stem, spec))
    counts: dict[str, int] = {}
    for name, _ in pairs:
        counts[name] = counts.get(name, 0) + 1
    # Stems collide for runs/*/last.pt: prefix the parent folder so every column stays distinguishable.
    named = [(f"{Path(p).parent.name}-{n}" if counts[n] > 1 else n, p) for n, p in pairs]
    if len({n for n, _ in named}) != len(named):
        raise EvaluationError(f"checkpoint names are not unique: {[n for n, _ in named]}; label them NAME=PATH")
    return named


def _trained_on(payload: dict[str, Any]) -> str:
    data = payload.get("data") or {}
    if not isinstance(data, dict):
        return "?"
    # rankshard-train records "train_variant"; hand-made checkpoints may say "variant"
    return str(data.get("train_variant", data.get("variant", "?")))


def load_checkpoints(specs: Sequence[str], device: str | torch.device = "cpu",
                     trust: bool = False, **overrides: Any) -> list[LoadedCheckpoint]:
    """Load every ``[NAME=]PATH`` with ``rankshard.train.checkpoint.model_from_checkpoint`` (weights_only unless
    ``trust``: full unpickling runs code from the file); models in eval mode on ``device``. ``overrides``
    (e.g. ``normalization="none"`` or ``{"mean": ..., "std": ...}``) go to ``model_from_checkpoint``."""
    loaded = []
    for name, path in split_names(specs):
        if not Path(path).is_file():
            raise EvaluationError(f"checkpoint {path}: no such file")
        model, payload = model_from_checkpoint(path, trust=trust, **overrides)
        size = payload.get("input_size")
        loaded.append(LoadedCheckpoint(name, str(path), model.to(device).eval(), int(payload["num_classes"]),
                                       None if size is None else int(size), _trained_on(payload), payload))
    return loaded


def common_input_size(ckpts: Sequence[LoadedCheckpoint], option: str) -> int | None:
    """The one input size the checkpoints declare (None if none does); several differing ones are an error
    naming ``option``, the way to pick one explicitly."""
    sizes = sorted({ck.input_size for ck in ckpts if ck.input_size is not None})
    if len(sizes) > 1:
        raise EvaluationError(f"the checkpoints declare different input sizes {sizes}; {option}")
    return sizes[0] if sizes else None


def check_fits(ckpt: LoadedCheckpoint, data: EvalData, allow_size_mismatch: bool = False) -> None:
    """Refuse a checkpoint whose class count or input size does not match the data (silent garbage otherwise)."""
    if ckpt.num_classes != data.num_classes:
        raise EvaluationError(f"checkpoint {ckpt.path} predicts {ckpt.num_classes} classes but {data.name} has "
                              f"{data.num_classes}; evaluate it on the dataset it was trained for")
    h, w = data.image_size
    if ckpt.input_size is not None and (h, w) != (ckpt.input_size, ckpt.input_size) and not allow_size_mismatch:
        raise EvaluationError(f"checkpoint {ckpt.path} was built for {ckpt.input_size}x{ckpt.input_size} inputs but "
                              f"{data.name} holds {h}x{w} images; materialize the data at {ckpt.input_size} pixels "
                              f"or pass --allow-size-mismatch to evaluate anyway")
