"""Sanity checks for saliency maps: the model-parameter randomization test (Adebayo et al. 2018).

A map that explains the model must change when the model's weights are destroyed. We re-initialize the
parameters either cascading from the top (classifier first, then the deepest stage, ... down to the stem,
each stage cumulative) or all at once, recompute the maps for the *same* explained classes (so that only
the weights differ), and report the Spearman rank correlation between each original and randomized map.
High correlation after randomization means the method shows the image (edges), not the model.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn


def _ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks of a flat array, ties sharing their average rank (as in Spearman's definition)."""
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based positions starts+1 .. ends
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two equally sized arrays (flattened); NaN if either is constant."""
    ra, rb = _ranks(np.ravel(a).astype(np.float64)), _ranks(np.ravel(b).astype(np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def layer_groups(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level children that hold parameters, from the output back to the input (cascade order)."""
    groups = [(name, m) for name, m in model.named_children() if any(True for _ in m.parameters())]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no parameterized children to randomize")
    return groups[::-1]


def reinitialize(module: nn.Module) -> None:
    """Reset every submodule that knows how (conv/linear: random init; batch norm: unit scale, fresh stats)."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _cascade(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    rand = copy.deepcopy(model)
    for name, _ in layer_groups(model):
        reinitialize(rand.get_submodule(name))
        yield f"cascade:{name}", rand


def _all_at_once(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    rand = copy.deepcopy(model)
    reinitialize(rand)
    yield "all", rand


RANDOMIZATIONS: dict[str, Callable[[nn.Module], Iterator[tuple[str, nn.Module]]]] = {
    "cascade": _cascade, "all": _all_at_once,
}


def randomized_models(model: nn.Module, mode: str = "cascade", seed: int = 0) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(stage name, randomized eval-mode copy)``; ``model`` itself is left untouched. Seeded."""
    if mode not in RANDOMIZATIONS:
        raise ValueError(f"unknown randomization {mode!r}; choose one of {sorted(RANDOMIZATIONS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, rand in RANDOMIZATIONS[mode](model):
            yield name, rand.eval()


def randomization_table(original: dict[str, np.ndarray], stages: list[tuple[str, dict[str, np.ndarray]]]
                        ) -> dict[str, list[dict]]:
    """Per method, per stage: mean Spearman correlation over images and the per-image values.

    ``original`` and each stage's maps are ``{method: [N, H, W]}``.
    """
    table: dict[str, list[dict]] = {}
    for method, maps in original.items():
        rows = []
        for stage, rand in stages:
            per_image = [spearman(a, b) for a, b in zip(maps, rand[method])]
            rows.append({"stage": stage, "spearman_mean": float(np.nanmean(per_image)) if per_image else None,
                         "spearman": per_image})
        table[method] = rows
    return table
