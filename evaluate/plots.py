"""Figures: accuracy vs rank for several checkpoints (paper Figs. 6, 7a, 7b) and their gaps (Figs. 7c, 7d)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on training/evaluation machines
import matplotlib.pyplot as plt  # noqa: E402


@dataclass(frozen=True)
class Curve:
    """One checkpoint's spectrum: ranks and, per rank, top-1 vs labels and agreement with full rank."""

    name: str
    ranks: tuple[int, ...]
    top1: tuple[float, ...]
    agreement: tuple[float, ...]


def curve_from_rows(name: str, rows: Sequence[dict]) -> Curve:
    """A ``Curve`` from ``summarize_spectrum`` rows."""
    return Curve(name, tuple(r["rank"] for r in rows), tuple(float(r["top1"]) for r in rows),
                 tuple(float(r["agreement"]) for r in rows))


AXIS_LABELS = {"high": "rank k (largest k singular values removed)",
               "lowpass": "k (k x k lowest 2-D DFT frequencies kept)",
               "highpass": "k (k x k lowest 2-D DFT frequencies removed)"}


def _axis_label(mode: str) -> str:
    return AXIS_LABELS.get(mode, "rank k of the input image")


def plot_spectra(curves: Sequence[Curve], mode: str, title: str, path: str | os.PathLike) -> Path:
    """Top-1 (left) and agreement with the full-rank prediction (right) vs rank, every checkpoint on one figure."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, field, label in ((axes[0], "top1", "top-1 accuracy (%)"),
                             (axes[1], "agreement", "agreement with full-rank prediction (%)")):
        for c in curves:
            ax.plot(c.ranks, [100 * v for v in getattr(c, field)], marker="." if len(c.ranks) < 40 else None,
                    label=c.name)
        ax.set_xlabel(_axis_label(mode))
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_gaps(curves: Sequence[Curve], mode: str, title: str, path: str | os.PathLike) -> Path:
    """Top-1 of each checkpoint minus the first one's (the baseline), per rank (paper Figs. 7c, 7d)."""
    base = curves[0]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for c in curves[1:]:
        shared = [k for k in c.ranks if k in set(base.ranks)]
        mine, theirs = dict(zip(c.ranks, c.top1)), dict(zip(base.ranks, base.top1))
        ax.plot(shared, [100 * (mine[k] - theirs[k]) for k in shared], label=f"{c.name} - {base.name}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel(_axis_label(mode))
    ax.set_ylabel("gap in top-1 accuracy (percentage points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save(fig, path)


def _eps_axis(norm: str) -> tuple[str, float]:
    """(label, scale): L-inf eps read in 1/255 steps as papers quote them; L2 in [0, 1] pixel units."""
    return ("eps (L-inf, in 1/255 of the pixel range)", 255.0) if norm == "linf" else ("eps (L2 norm, [0, 1] pixels)", 1.0)


def plot_robustness(rows: Sequence[dict], norm: str, title: str, path: str | os.PathLike) -> Path:
    """Robust accuracy vs eps: one curve per checkpoint and attack (``robustness`` result rows)."""
    label, scale = _eps_axis(norm)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    styles = ["-", "--", ":", "-."]
    for c, name in enumerate(dict.fromkeys(r["checkpoint"] for r in rows)):
        for a, attack in enumerate(attacks):  # colour: checkpoint; line style: attack
            pts = sorted((r["eps"], r["robust_accuracy"]) for r in rows if r["checkpoint"] == name and r["attack"] == attack)
            ax.plot([e * scale for e, _ in pts], [100 * v for _, v in pts], styles[a % len(styles)], marker="o", color=f"C{c % 10}",
                    label=f"{name} ({attack})" if len(attacks) > 1 else name)
    ax.set_xlabel(label)
    ax.set_ylabel("robust accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _band_axes(ax, bands: Sequence, xlabel: str, ylabel: str) -> None:
    """Mean line per seed group and, where it has >= 2 seeds, its 95% CI as a shaded band."""
    for b in bands:
        mean = [100 * v for v in b.mean]
        (line,) = ax.plot(b.x, mean, marker="." if len(b.x) < 40 else None, label=f"{b.name} (n={b.seeds})")
        if b.seeds > 1:
            ax.fill_between(b.x, [100 * v for v in b.low], [100 * v for v in b.high], color=line.get_color(),
                            alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def plot_bands(bands: Sequence, mode: str, title: str, path: str | os.PathLike) -> Path:
    """Top-1 vs k: mean over seeds per group, shaded 95% confidence band (Student t over seeds)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    _band_axes(ax, bands, _axis_label(mode), "top-1 accuracy (%), mean ± 95% CI over seeds")
    ax.set_title(title)
    return _save(fig, path)


def plot_side_by_side(panels: dict[str, Sequence], title: str, path: str | os.PathLike) -> Path:
    """One panel per mode (``{mode: bands}``), shared y axis: e.g. rank-k vs k x k low-pass inputs."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), sharey=True, squeeze=False)
    for ax, (mode, bands) in zip(axes[0], panels.items()):
        _band_axes(ax, bands, _axis_label(mode), "top-1 accuracy (%)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_delta_rank(summaries: dict[str, dict], isotropic: Sequence[float], title: str,
                    path: str | os.PathLike) -> Path:
    """Rank structure of the attack's perturbation per checkpoint: its own energy retained vs rank k (left) and its
    share inside the clean image's top-k singular subspaces (right), beside an isotropic perturbation's."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    panels = ((axes[0], "spectrum", "delta's energy kept by\nits own rank-k truncation (%)"),
              (axes[1], "in_image", "delta's energy inside the clean\nimage's top-k singular subspaces (%)"))
    for ax, field, label in panels:
        for name, summary in summaries.items():
            curve = summary[field]
            ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], label=f"{name} (n={summary['samples']})")
        ax.set_xlabel("rank k")
        ax.set_ylabel(label)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[1].plot(range(1, len(isotropic) + 1), [100 * v for v in isotropic], "k--", lw=1,
                 label="isotropic delta (k^2 / HW)")
    for ax in axes:
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_rank_path(paths: dict[str, Sequence[dict]], targeted: bool, title: str, path: str | os.PathLike) -> Path:
    """Algorithm 1 on clean and adversarial inputs per checkpoint: top-1 on the clean x_k (solid) and recovery on
    the adversarial x'_k (dashed) vs k (left); the attack's success on x'_k (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for i, (name, rows) in enumerate(paths.items()):
        ranks, colour = [r["rank"] for r in rows], f"C{i % 10}"
        axes[0].plot(ranks, [100 * r["clean_top1"] for r in rows], color=colour, label=f"{name}: clean x_k")
        axes[0].plot(ranks, [100 * r["adv_recovery"] for r in rows], "--", color=colour, label=f"{name}: adversarial x'_k")
        axes[1].plot(ranks, [100 * r["adv_success"] for r in rows], color=colour, label=name)
    axes[0].set_ylabel("top-1 accuracy (%)")
    axes[1].set_ylabel(f"{'targeted' if targeted else 'untargeted'} attack success on x'_k (%)")
    for ax in axes:
        ax.set_xlabel("rank k of the input (k largest singular values kept)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title + "\n(the attack was made on the full-rank input: not adaptive to the truncation)", fontsize="medium")
    return _save(fig, path)
