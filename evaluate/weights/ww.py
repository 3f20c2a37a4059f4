"""WeightWatcher's conventions for the power-law alpha, reimplemented (``WeightsConfig.ww_conventions``).

Read from WeightWatcher's source (CalculatedContent/WeightWatcher, ``weightwatcher.py`` and
``WW_powerlaw.py`` at commit d6fd015, June 2025; ``analyze()`` defaults ``pool=True``,
``conv2d_fft=False``, ``conv2d_norm=True``, ``pl_package='ww'``, ``min_evals=10``):

* **Conv2d ``[out, in, kh, kw]``**: one ``out x in`` matrix per kernel position, ``W[:, :, i, j]``
  (``conv2D_Wmats``); with ``pool=True`` the squared singular values of all ``kh*kw`` slices are pooled into
  one ESD of ``kh*kw*min(out, in)`` values. rankshard's default instead takes the singular values of the
  unfolded ``out x (in*kh*kw)`` matrix (``min(out, in*kh*kw)`` values). A 1x1 conv is the same matrix in
  both conventions.
* **Scale**: each slice is multiplied by ``sqrt(conv2d_count / 2)`` with ``conv2d_count = 1`` when pooled,
  eigenvalues are ``sigma**2`` (not divided by N); only eigenvalues ``> 1e-5`` are fitted. Alpha is scale
  free, so the scale only matters for that threshold. Linear layers: ``sigma**2`` of the matrix, no factor.
* **Fit** (``WWFit``): every sorted eigenvalue but the largest is an ``x_min`` candidate (no minimum tail,
  no thinning), alpha is the continuous MLE and the distance is one-sided,
  ``max |1 - (x/x_min)^(1-alpha) - i/n|`` over the tail; candidates with ``alpha <= 1`` score 1; ties go to
  the smallest ``x_min``. rankshard's default fit needs ``alpha_min_tail`` values, scans at most 200
  quantile-spaced candidates on a spectrum thinned to 5000 points and uses both sides of the empirical CDF.
* Layers with fewer than ``min_evals = 10`` eigenvalues are skipped by WeightWatcher: alpha is NaN here,
  with that reason.
"""
from __future__ import annotations

import numpy as np
import torch

from rankshard.evaluate.weights.rmt import PowerLawFit, RMTConfig, assess_powerlaw

WW_EVALS_THRESH = 1e-5  # EVALS_THRESH in weightwatcher/constants.py
WW_MIN_EVALS = 10  # DEFAULT_MIN_EVALS
_CHUNK = 256  # x_min candidates scored at once: a [256, n] float64 grid stays under ~10 MB for n = 4608


def ww_evals(weight: torch.Tensor) -> np.ndarray:
    """WeightWatcher's pooled ESD of a Conv2d (``[out, in, kh, kw]``) or Linear (``[out, in]``) weight, sorted."""
    w = weight.detach().to(torch.float64).cpu()
    if w.dim() == 4:
        slices = w.permute(2, 3, 0, 1).reshape(-1, *w.shape[:2]) * np.sqrt(0.5)  # [kh*kw, out, in]
    elif w.dim() == 2:
        slices = w[None]
    else:
        raise ValueError(f"ww_evals: expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")
    evals = (torch.linalg.svdvals(slices) ** 2).reshape(-1).numpy()
    return np.sort(evals[evals > WW_EVALS_THRESH])


def ww_fit_powerlaw(evals: np.ndarray, cfg: RMTConfig = RMTConfig()) -> PowerLawFit:
    """WeightWatcher's ``WWFit`` on ``evals``, plus rankshard's reliability verdict (``assess_powerlaw``)."""
    x = np.sort(np.asarray(evals, dtype=np.float64))
    if x.size < WW_MIN_EVALS:
        return PowerLawFit(float("nan"), float("nan"), float("nan"), 0,
                           reason=f"WeightWatcher skips layers with < {WW_MIN_EVALS} eigenvalues ({x.size})")
    n = x.size
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # sum of log x[i:]
    best = (np.inf, 0, np.nan)
    for start in range(0, n - 1, _CHUNK):
        idx = np.arange(start, min(start + _CHUNK, n - 1))
        n_tail = (n - idx).astype(np.float64)
        with np.errstate(divide="ignore"):
            alpha = 1.0 + n_tail / (suffix[idx] - n_tail * logx[idx])
        rank = np.arange(n)[None, :] - idx[:, None]
        with np.errstate(over="ignore", invalid="ignore"):
            model = 1.0 - np.exp((1.0 - alpha[:, None]) * (logx[None, :] - logx[idx][:, None]))
        dist = np.where(rank >= 0, np.abs(model - rank / n_tail[:, None]), 0.0).max(axis=1)
        dist = np.where(alpha > 1.0, dist, 1.0)
        i = int(np.argmin(dist))
        if dist[i] < best[0]:  # strict: the first (smallest x_min) minimum wins, as np.argmin over all
            best = (float(dist[i]), int(idx[i]), float(alpha[i]))
    ks, i, alpha = best
    return assess_powerlaw(PowerLawFit(alpha, float(x[i]), ks, n - i), cfg)


def ww_stats(weight: torch.Tensor, cfg: RMTConfig = RMTConfig()) -> dict:
    """``ww_*`` table columns: alpha, its x_min, KS, tail size, reliability, and the ESD size."""
    evals = ww_evals(weight)
    fit = ww_fit_powerlaw(evals, cfg)
    return {"ww_n_values": int(evals.size), "ww_alpha": fit.alpha, "ww_alpha_xmin": fit.xmin,
            "ww_alpha_ks": fit.ks, "ww_alpha_n_tail": fit.n_tail, "ww_alpha_reliable": fit.reliable,
            "ww_alpha_reason": fit.reason}
