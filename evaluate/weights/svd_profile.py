"""Influential singular directions per class (DeepDataProfiler's SVD profile) and their class-overlap hypergraph.

Definition used here (Praggastis et al., "The SVD of Convolutional Weights", DeepDataProfiler's ``SVDProfiler``):

* Each chosen Conv2d/Linear layer is decomposed as in ``rankshard.evaluate.weights.spectra.unfold_svd``:
  ``W.reshape(out, -1) = U S V^T``. Its *singular directions* are the left singular vectors ``u_i`` (in the
  layer's output space), ordered by singular value; ``top_k`` of them are analysed.
* The layer's **output** activations are hooked (as DeepDataProfiler does) and the bias is removed, so at every
  spatial position ``j`` the activation is ``y_j = W p_j`` for the input patch ``p_j``. Its projection on
  direction ``i`` is ``u_i^T y_j = s_i v_i^T p_j``: hooking the input and projecting the patches on
  ``s_i v_i`` would give the same numbers; the output side also covers grouped convolutions.
* The magnitude of direction ``i`` for an image is the L2 norm of its projections over all spatial positions
  (for a Linear layer, the absolute projection).
* An image's **influential** directions are the fewest directions, taken by decreasing magnitude, whose
  magnitudes sum to at least ``mass`` of the total over the analysed directions (DeepDataProfiler's
  cumulative-threshold rule).
* A class's profile counts, per direction, how many of its images have it influential (DeepDataProfiler sums
  image profiles). A direction belongs to the class's **hyperedge** when it is influential for at least
  ``class_share`` of the class's images; the default ``0`` keeps the union (at least one image), which is
  the support of the summed profile used for the paper's hypergraph.
* The hypergraph has one node per (layer, direction) and one hyperedge per class; the incidence matrix is
  classes x nodes, and class overlap is the Jaccard index ``|A & B| / |A | B|`` of hyperedges (two empty
  hyperedges are identical: Jaccard 1).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.results import write_result
from rankshard.evaluate.weights.spectra import select_layers, unfold_svd


class ProfileError(EvaluationError):
    """svd-profile options or data that do not fit together."""


@dataclass(frozen=True)
class ProfileConfig:
    """Everything that decides the numbers of an SVD profile (dumped into svd-profile.json)."""
    layers: str = "*"  # comma-separated fnmatch patterns over module names
    top_k: int | None = None  # leading singular directions per layer; None: all of them
    mass: float = 0.5  # share of an image's total magnitude its influential directions must carry
    class_share: float = 0.0  # share of a class's images a direction must be influential for (0: union)
    per_class: int = 20  # images per class

    def __post_init__(self) -> None:
        if not 0 < self.mass <= 1:
            raise ProfileError(f"--mass {self.mass}: must be in (0, 1], e.g. 0.5 for half of each image's total")
        if not 0 <= self.class_share <= 1:
            raise ProfileError(f"--class-share {self.class_share}: must be in [0, 1] (0 keeps the union)")
        if self.per_class < 1:
            raise ProfileError(f"--per-class {self.per_class}: must be a positive number of images")
        if self.top_k is not None and self.top_k < 1:
            raise ProfileError(f"--top-k {self.top_k}: must be positive (omit it to analyse every direction)")


@dataclass(frozen=True)
class LayerBasis:
    """Top singular directions of one layer: ``u [out, K]``, ``s [K]``, and the bias removed before projecting."""
    u: torch.Tensor
    s: torch.Tensor
    bias: torch.Tensor | None


def layer_bases(model: nn.Module, patterns: str, top_k: int | None) -> dict[str, LayerBasis]:
    """Unfolded SVD of every selected layer, keeping ``top_k`` directions (all when None)."""
    try:
        chosen = select_layers(model, patterns)
    except ValueError as err:
        raise ProfileError(str(err)) from None
    bases = {}
    for name, module in chosen:
        svd = unfold_svd(module.weight)
        k = svd.s.numel() if top_k is None else min(top_k, svd.s.numel())
        bias = None if module.bias is None else module.bias.detach().float()
        bases[name] = LayerBasis(svd.u[:, :k].float(), svd.s[:k].float(), bias)
    return bases


def direction_magnitudes(activation: torch.Tensor, basis: LayerBasis) -> torch.Tensor:
    """``[B, K]``: per image, the L2 norm over positions of the (bias-free) activation projected on each ``u_i``."""
    act = activation.detach()
    act = act if act.dtype == torch.float64 else act.float()  # half-precision activations: project in float32
    u = basis.u.to(act.device, act.dtype)
    if basis.bias is not None:
        act = act - basis.bias.to(act.device, act.dtype).reshape(1, -1, *([1] * (act.dim() - 2)))
    flat = act.reshape(act.shape[0], act.shape[1], -1)  # [B, out, positions]
    coeffs = torch.einsum("bop,ok->bkp", flat, u)
    return coeffs.norm(dim=2)


def influential(magnitudes: torch.Tensor, mass: float) -> torch.Tensor:
    """Boolean ``[B, K]``: the fewest largest directions whose magnitudes reach ``mass`` of each row's total.

    A direction is kept when the magnitudes sorted before it sum to less than ``mass * total``; an all-zero
    row keeps nothing. Ties are broken by direction index (stable sort), so results are deterministic.
    """
    mags = magnitudes.double()
    order = torch.sort(mags, dim=1, descending=True, stable=True).indices
    ranked = torch.gather(mags, 1, order)
    before = torch.cumsum(ranked, dim=1) - ranked
    target = mass * mags.sum(dim=1, keepdim=True)
    keep_ranked = (before < target) & (target > 0)
    keep = torch.zeros_like(keep_ranked)
    return keep.scatter(1, order, keep_ranked)


@torch.no_grad()
def collect_magnitudes(model: nn.Module, batches: Iterable, bases: dict[str, LayerBasis], num_classes: int,
                       per_class: int, device: torch.device | str = "cpu",
                       on_images: Callable[[int], None] | None = None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward up to ``per_class`` images of each class; returns (layer -> magnitudes ``[N, K]``, labels ``[N]``)."""
    modules = dict(model.named_modules())
    current: dict[str, torch.Tensor] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _a, out, name=name: current.__setitem__(name, direction_magnitudes(out, bases[name]).cpu()))
        for name in bases]
    counts = torch.zeros(num_classes, dtype=torch.long)
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in bases}
    labels: list[torch.Tensor] = []
    model.eval()
    try:
        for batch in batches:
            keep = _take(batch.y, counts, per_class)
            if keep.numel():
                current.clear()
                model(batch.x[keep].to(device))
                missing = [name for name in bases if name not in current]
                if missing:
                    raise ProfileError(f"layers {missing} are never called in the forward pass; "
                                       f"choose others with --layers")
                labels.append(batch.y[keep])
                if on_images is not None:
                    on_images(len(keep))
                for name in bases:
                    parts[name].append(current[name])
            if bool((counts >= per_class).all()):
                break
    finally:
        for h in handles:
            h.remove()
    if not labels:
        raise ProfileError("no images were read: the split holds no samples of any class")
    return {name: torch.cat(p) for name, p in parts.items()}, torch.cat(labels)


def _take(y: torch.Tensor, counts: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the batch images whose class still needs images (updates ``counts`` in place)."""
    keep = []
    for i, label in enumerate(y.tolist()):
        if 0 <= label < len(counts) and counts[label] < per_class:
            counts[label] += 1
            keep.append(i)
    return torch.tensor(keep, dtype=torch.long)


def class_counts(flags: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(``[C, K]`` images of each class with each direction influential, ``[C]`` images per class)."""
    onehot = torch.nn.functional.one_hot(labels.long(), num_classes).double()  # [N, C]
    counts = onehot.T @ flags.double()
    return counts.round().long().numpy(), onehot.sum(0).round().long().numpy()


def class_incidence(counts: np.ndarray, images: np.ndarray, share: float) -> np.ndarray:
    """Boolean ``[C, K]``: direction influential for at least ``max(1, ceil(share * images))`` of the class."""
    need = np.maximum(1, np.ceil(share * images.astype(np.float64) - 1e-9)).astype(np.int64)
    return (counts >= need[:, None]) & (images[:, None] > 0)


def jaccard(incidence: np.ndarray) -> np.ndarray:
    """``[C, C]`` Jaccard index between the rows of a boolean incidence matrix (empty vs empty: 1)."""
    inc = incidence.astype(np.int64)
    inter = inc @ inc.T
    sizes = inc.sum(axis=1)
    union = sizes[:, None] + sizes[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@dataclass(frozen=True)
class LayerProfile:
    """Per-layer result: singular values, per-class counts and the class x direction incidence."""
    singular_values: np.ndarray
    counts: np.ndarray
    incidence: np.ndarray


@dataclass(frozen=True)
class SvdProfile:
    """Everything svd-profile writes: per-layer profiles and the combined hypergraph."""
    classes: tuple[str, ...]
    images: np.ndarray  # [C] images per class
    layers: dict[str, LayerProfile]
    nodes: list[str]  # "layer:i" for every column of ``incidence``
    incidence: np.ndarray  # [C, nodes]
    jaccard: np.ndarray  # [C, C]


def profile_model(model: nn.Module, batches: Iterable, num_classes: int, cfg: ProfileConfig,
                  classes: tuple[str, ...] = (), device: torch.device | str = "cpu",
                  on_images: Callable[[int], None] | None = None) -> SvdProfile:
    """Influential directions per class for every selected layer, and the class hypergraph over all layers;
    ``on_images(n)`` is told of every ``n`` images profiled (progress)."""
    bases = layer_bases(model, cfg.layers, cfg.top_k)
    mags, labels = collect_magnitudes(model, batches, bases, num_classes, cfg.per_class, device, on_images)
    layers, nodes, columns = {}, [], []
    for name, basis in bases.items():
        counts, images = class_counts(influential(mags[name], cfg.mass), labels, num_classes)
        inc = class_incidence(counts, images, cfg.class_share)
        layers[name] = LayerProfile(basis.s.numpy(), counts, inc)
        nodes += [f"{name}:{i}" for i in range(inc.shape[1])]
        columns.append(inc)
    incidence = np.concatenate(columns, axis=1)
    names = tuple(classes) if len(classes) == num_classes else tuple(str(c) for c in range(num_classes))
    return SvdProfile(names, images, layers, nodes, incidence, jaccard(incidence))


def write_profile(profile: SvdProfile, cfg: ProfileConfig, out: str | Path, source: dict,
                  device: str | torch.device = "cpu") -> Path:
    """The ``svd-profile.json`` result (config, per-layer counts/incidence/Jaccard, summary) and its side
    files hypergraph.json, jaccard.json and jaccard.png; returns the result's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(profile.classes)
    per_layer = {name: {"singular_values": lp.singular_values.tolist(), "counts": lp.counts.tolist(),
                        "incidence": lp.incidence.astype(int).tolist(), "jaccard": jaccard(lp.incidence).tolist()}
                 for name, lp in profile.layers.items()}
    sides = {
        "hypergraph.json": {"classes": classes, "nodes": profile.nodes,
                            "incidence": profile.incidence.astype(int).tolist(),
                            "edges": {c: [n for n, on in zip(profile.nodes, row) if on]
                                      for c, row in zip(classes, profile.incidence)}},
        "jaccard.json": {"classes": classes, "matrix": profile.jaccard.tolist()},
    }
    for fname, body in sides.items():
        (out / fname).write_text(json.dumps(body, indent=1))
    figure = jaccard_heatmap(profile.jaccard, classes, out / "jaccard.png")
    body = {"source": source, "classes": classes, "images_per_class": profile.images.tolist(), "layers": per_layer,
            "summary": layer_summary(profile), "most_overlapping": most_overlapping(profile)}
    return write_result(out, "svd-profile", body, config=asdict(cfg), device=device, figures=[figure],
                        files=[out / f for f in sides])


def jaccard_heatmap(matrix: np.ndarray, classes: list[str], path: Path) -> Path:
    """Class x class Jaccard heatmap (matplotlib Agg); labels shown only when there are few classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    side = min(12.0, 3.0 + 0.35 * len(classes))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    if len(classes) <= 40:  # 1000 ImageNet labels would be unreadable
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_title("Jaccard overlap of influential singular directions")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def layer_summary(profile: SvdProfile) -> list[dict]:
    """Per layer: analysed directions and the mean hyperedge size (directions per class)."""
    return [{"layer": name, "directions": int(lp.incidence.shape[1]),
             "mean_hyperedge_size": round(float(lp.incidence.sum(1).mean()), 2)} for name, lp in profile.layers.items()]


def most_overlapping(profile: SvdProfile) -> dict | None:
    """The pair of distinct classes with the largest Jaccard overlap (None with a single class)."""
    if len(profile.classes) < 2:
        return None
    off = np.where(np.eye(len(profile.classes), dtype=bool), -math.inf, profile.jaccard)
    i, j = np.unravel_index(np.argmax(off), off.shape)
    return {"classes": [profile.classes[i], profile.classes[j]], "jaccard": float(profile.jaccard[i, j])}


def summary(profile: SvdProfile) -> str:
    """A few lines for the terminal: per-layer mean hyperedge size and the most-overlapping class pair."""
    lines = [f"{len(profile.classes)} classes, {int(profile.images.sum())} images, {len(profile.nodes)} directions"]
    lines += [f"  {r['layer']}: {r['directions']} directions, mean hyperedge size {r['mean_hyperedge_size']:.1f}"
              for r in layer_summary(profile)]
    pair = most_overlapping(profile)
    if pair:
        lines.append(f"most overlapping: {pair['classes'][0]} / {pair['classes'][1]} (Jaccard {pair['jaccard']:.3f})")
    return "\n".join(lines)
