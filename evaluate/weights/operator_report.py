"""Figures and arrays of the zero-padded operator and of the sensitivities (called by ``report.py``).

    <model>/lipschitz.png     per-layer sigma_max (zero-padded, circular, unfolded) and the running product
    <model>/sensitivity.png   per-filter importance of the first conv layers (operator and unfolded)
    <model>/sensitivity.npz   "<layer>/unfolded", "/unfolded_topk", "/operator_zero": [out] importances

The running product of per-layer Lipschitz constants upper-bounds the network's Lipschitz constant only for
a plain chain of layers with 1-Lipschitz activations between them; residual additions, batch norm and
pooling are not in it, so for a ResNet the curve shows how the conv layers alone compound.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_SERIES = (("operator_zero_sigma_max", "zero-padded operator (exact Lipschitz)", "C0"),
           ("operator_circular_sigma_max", "circular operator (FFT)", "C1"),
           ("unfolded_spectral_norm", "unfolded matrix", "C2"))


def plot_lipschitz(rows: list[dict], path: Path, dpi: int = 110) -> bool:
    """Per-layer sigma_max and its running product over depth (log scale); False without zero-operator columns."""
    if not any("operator_zero_sigma_max" in r for r in rows):
        return False
    fig = Figure(figsize=(10, 6), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    for key, label, color in _SERIES:
        pts = [(r["index"], r[key]) for r in rows if isinstance(r.get(key), float) and np.isfinite(r[key])]
        if not pts:
            continue
        x, y = map(np.asarray, zip(*pts))
        top.plot(x, y, ".-", color=color, ms=3, label=label)
        bottom.plot(x, np.cumprod(y), "-", color=color, label=label)
    top.set_ylabel("sigma_max per layer", fontsize=8)
    bottom.set_ylabel("running product", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("layer (forward order)", fontsize=8)
    top.legend(fontsize=7)
    fig.suptitle("Layer Lipschitz constants (l2) at the probe resolution; product = bound of a plain chain", fontsize=9)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return True


def save_sensitivity(results, path: Path) -> bool:
    """Per-filter importance arrays of every layer that has them; False if none."""
    arrays = {}
    for r in results:
        sens = r.extras.sensitivity
        if sens is None:
            continue
        arrays[f"{r.info.name}/unfolded"] = sens.unfolded
        arrays[f"{r.info.name}/unfolded_topk"] = sens.unfolded_topk
        if sens.operator is not None:
            arrays[f"{r.info.name}/operator_zero"] = sens.operator
    if arrays:
        np.savez_compressed(path, **arrays)
    return bool(arrays)


def plot_sensitivity(results, path: Path, layers: int = 8, dpi: int = 110) -> bool:
    """Bars: per-filter importance for the zero-padded operator's sigma_max; line: the unfolded one."""
    shown = [r for r in results if r.extras.sensitivity is not None and r.info.kind == "conv"][:layers]
    if not shown:
        return False
    cols = min(4, len(shown))
    fig = Figure(figsize=(3.2 * cols, 2.4 * -(-len(shown) // cols)), layout="constrained")
    axes = fig.subplots(-(-len(shown) // cols), cols, squeeze=False).ravel()
    for ax, r in zip(axes, shown):
        sens = r.extras.sensitivity
        x = np.arange(sens.unfolded.size)
        if sens.operator is not None:
            ax.bar(x, sens.operator, color="C0", width=1.0, label="operator (zero pad)")
        ax.plot(x, sens.unfolded, color="C3", lw=0.8, label="unfolded |u1|")
        ax.set_title(r.info.name, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle("||d sigma_max / d W[o]|| per output filter o", fontsize=9)
    fig.supxlabel("output filter o", fontsize=8)
    fig.supylabel("||d sigma_max / d W[o]||", fontsize=8)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi)
    return True


def write_operator_report(results, rows: list[dict], folder: Path, dpi: int = 110) -> None:
    """Everything above for one model folder (each piece only when its data was computed)."""
    plot_lipschitz(rows, folder / "lipschitz.png", dpi)
    save_sensitivity(results, folder / "sensitivity.npz")
    plot_sensitivity(results, folder / "sensitivity.png", dpi=dpi)
