"""Figures of saliency maps: one row per image (original, then one column per map), like the paper's Fig. 1.

Colour normalization is per map: the colour scale ends at the ``clip`` percentile of |map| (default 99th),
so a few extreme pixels do not wash out the rest; magnitudes (max-abs maps) use grey from 0 to that value,
signed maps a diverging scale symmetric around 0. The rule is printed under every figure.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


@dataclass(frozen=True)
class Column:
    """One figure column: ``title``, ``maps [N, H, W]``, and whether values are signed (diverging colours)."""

    title: str
    maps: np.ndarray
    signed: bool = False


def clip_limits(m: np.ndarray, clip: float, signed: bool) -> tuple[float, float]:
    """Colour limits of one map: ``(0, p)`` or ``(-p, p)`` with p the ``clip`` percentile of |m|."""
    p = float(np.percentile(np.abs(m), clip)) if m.size else 0.0
    p = p if p > 0 else float(np.abs(m).max()) or 1.0  # a mostly-zero map: fall back to its maximum
    return (-p, p) if signed else (0.0, p)


def rows_figure(images: np.ndarray, columns: list[Column], row_labels: list[str], title: str,
                clip: float = 99.0, cell: float = 1.9):
    """A matplotlib figure: per image a row [original | column maps...]; ``images`` is ``[N, 3, H, W]``."""
    n, ncols = len(images), 1 + len(columns)
    fig, axes = plt.subplots(n, ncols, figsize=(cell * ncols, cell * n + 0.9), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(np.clip(images[i].transpose(1, 2, 0), 0, 1), interpolation="nearest")
        axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
        for j, col in enumerate(columns, start=1):
            vmin, vmax = clip_limits(col.maps[i], clip, col.signed)
            axes[i, j].imshow(col.maps[i], cmap="RdBu_r" if col.signed else "gray", vmin=vmin, vmax=vmax,
                              interpolation="nearest")
    for j, name in enumerate(["original"] + [c.title for c in columns]):
        axes[0, j].set_title(name, fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.005, f"colour: each map scaled to its own {clip:g}th percentile of |value| (clipped above); "
             "grey 0..p for magnitudes, blue-red -p..p for signed maps", ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def save_rows_figure(path: str | Path, images: np.ndarray, columns: list[Column], row_labels: list[str],
                     title: str, clip: float = 99.0) -> Path:
    """Write ``rows_figure`` to ``path`` (PNG, 150 dpi) and close it."""
    path = Path(path)
    fig = rows_figure(images, columns, row_labels, title, clip)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
