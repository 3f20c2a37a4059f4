"""Per-layer additions to a weights analysis: the zero-padded operator, sensitivities, WeightWatcher's alpha.

Kept apart from ``spectra.py`` (which computes the circular spectra) so each piece can be switched on by
``WeightsConfig`` without touching that numeric core: ``layer_extras`` returns extra table columns and
the arrays the report draws.

Column names say which operator they describe:

* ``operator_circular_*``: the FFT spectrum of ``spectra.py`` (circular padding); ``operator_*`` without
  a qualifier keeps that meaning for backward compatibility;
* ``operator_zero_*``: the convolution as the layer applies it (zero padding, its stride, dilation and
  groups, at the input resolution the probe saw), top-k by block Lanczos (``operator.py``). Its
  ``sigma_max`` is the layer's exact ℓ2 Lipschitz constant at that resolution; for a Linear layer it is
  the matrix's spectral norm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from rankshard.evaluate.weights.operator import ConvGeometry, ConvOperator, TopSingular, top_singular
from rankshard.evaluate.weights.sensitivity import LayerSensitivity, layer_sensitivity
from rankshard.evaluate.weights.ww import ww_stats

if TYPE_CHECKING:  # spectra imports this module; the types are only for readers and checkers
    from rankshard.evaluate.weights.spectra import LayerInfo, Spectrum, UnfoldedSVD, WeightsConfig


@dataclass(frozen=True)
class LayerExtras:
    """Extra columns of one layer's row, and the arrays behind them."""
    columns: dict
    zero: TopSingular | None = None
    sensitivity: LayerSensitivity | None = None


def _top(values: np.ndarray, k: int) -> str:
    """The first ``k`` values as one ``;``-separated cell (CSV-friendly, 7 significant digits)."""
    return ";".join(f"{v:.7g}" for v in np.asarray(values)[:k])


def zero_operator(info: "LayerInfo", cfg: "WeightsConfig") -> tuple[dict, TopSingular | None, ConvOperator | None]:
    """``operator_zero_*`` columns of a conv layer (top ``cfg.zero_top_k``), the triplets and the operator."""
    t0 = time.perf_counter()
    geom = ConvGeometry(info.weight.shape[1] * info.groups, info.input_hw, info.stride, info.padding,
                        info.dilation, info.groups, info.padding_mode)
    dtype = torch.float64 if cfg.zero_dtype == "float64" else torch.float32
    op = ConvOperator(info.weight, geom, dtype, cfg.device)
    top = top_singular(op, cfg.zero_top_k, cfg.lanczos)
    s = top.s.double().cpu().numpy()
    cols = {"operator_zero_sigma_max": float(s[0]), "operator_zero_top": _top(s, len(s)),
            "operator_zero_converged": top.converged, "operator_zero_residual": top.residual,
            "operator_zero_gram_products": top.gram_products,
            "operator_zero_seconds": round(time.perf_counter() - t0, 4)}
    return cols, top, op


def circular_columns(spectra: dict[str, "Spectrum"], k: int) -> dict:
    """``operator_circular_sigma_max`` / ``_top``: the circular values under explicit names."""
    circ = spectra.get("operator")
    if circ is None:
        return {}
    return {"operator_circular_sigma_max": float(circ.svals[0]), "operator_circular_top": _top(circ.svals, k)}


def layer_extras(info: "LayerInfo", full: "UnfoldedSVD", spectra: dict[str, "Spectrum"],
                 cfg: "WeightsConfig") -> tuple[LayerExtras, tuple[str, ...]]:
    """Everything ``cfg`` switches on beyond the circular spectra, plus notes explaining any gap."""
    cols, notes = circular_columns(spectra, max(cfg.zero_top_k, 1)), []
    zero = op = None
    if cfg.zero_top_k > 0 and info.kind == "conv":
        if info.input_hw is None:
            notes.append("operator_zero: not reached by the probe forward pass, input resolution unknown")
        else:
            zero_cols, zero, op = zero_operator(info, cfg)
            cols.update(zero_cols)
            if not zero.converged:
                notes.append(f"operator_zero: Lanczos stopped after {zero.gram_products} products without "
                             f"converging (residual {zero.residual:.1e}); raise LanczosConfig.max_cycles")
    elif cfg.zero_top_k > 0:  # a Linear layer's operator is its matrix: exact from the unfolded SVD
        cols.update({"operator_zero_sigma_max": float(full.s[0]), "operator_zero_top": _top(full.s.numpy(),
                                                                                               cfg.zero_top_k)})
    if "operator_zero_sigma_max" in cols and "operator_circular_sigma_max" in cols:
        cols["operator_circular_over_zero"] = cols["operator_circular_sigma_max"] / cols["operator_zero_sigma_max"]
    sens = None
    if cfg.sensitivity:
        sens = layer_sensitivity(full.u, full.vh, tuple(info.weight.shape), cfg.top_k, op, zero)
        cols.update(sens.columns())
    if cfg.ww_conventions:
        cols.update(ww_stats(info.weight, cfg.rmt))
    return LayerExtras(cols, zero, sens), tuple(notes)
