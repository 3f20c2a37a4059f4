"""Frequency truncation beside rank truncation: keep (``lowpass-k``) or remove (``highpass-k``) the k x k lowest
2-D DFT frequencies of every channel.

Definition (exact; frequencies are signed DFT indices ``f`` in ``-n/2 .. n/2``, centred on 0 = the mean):

* odd k: along each axis keep ``|f| <= (k - 1) / 2`` -- k frequencies, a symmetric set, so the output is real;
* even k: keep ``|f| <= k/2 - 1`` (k - 1 frequencies) plus the **cosine half** of the pair ``f = ±k/2``: both
  coefficients are replaced by their average ``(X[k/2] + X[-k/2]) / 2`` (for real input ``Re X[k/2]``). That
  keeps ``cos(2π (k/2) t / n)`` and drops ``sin``: one more real dimension, so exactly k real basis functions
  per axis, the set stays symmetric under ``f -> -f`` and the output real. (Keeping both halves of the pair
  would give rank k + 1; keeping one side only would give a complex image.) If ``k/2`` is the Nyquist index
  ``n/2`` the pair is one real coefficient and is kept whole;
* ``k = 0`` gives zeros, ``k >= n`` along an axis keeps every frequency of that axis (the image itself).

The 2-D filter is the product of the per-axis filters (a k x k box of frequencies), so per channel
``lowpass(X) = L_H X L_W^T`` with real n x n matrices of rank ``min(k, n)``: the paper's appendix hypothesis
(rank of a k x k low-pass image <= k) holds by construction, and ``numeric_rank`` measures it on data.
Each ``L`` is an orthogonal projection (onto DC and the lowest cos/sin pairs), so energies add:
``|lowpass(x)|^2 + |highpass(x)|^2 = |x|^2`` per channel. ``highpass(x) = x - lowpass(x)`` (values may be
negative: stored as npy, like high rank).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


def kept_frequencies(n: int, k: int) -> tuple[list[int], int | None]:
    """Signed frequencies kept whole along an axis of length ``n``, and the even-k ``±k/2`` pair (or None)."""
    if k >= n:
        return list(range(-((n - 1) // 2), n // 2 + 1)), None  # every frequency (Nyquist included for even n)
    if k <= 0:
        return [], None
    half = (k - 1) // 2 if k % 2 else k // 2 - 1
    return list(range(-half, half + 1)), (k // 2 if k % 2 == 0 else None)


@lru_cache(maxsize=64)
def lowpass_matrix(n: int, k: int) -> np.ndarray:
    """The real n x n matrix ``L`` of the 1-D filter (float64): ``L @ v`` low-passes a length-n signal ``v``.

    Built from its definition in the frequency domain, ``L = Re(F^-1 M F)`` with ``M`` the kept-coefficient
    map (identity on the kept frequencies, the ±k/2 average for even k); ``F^-1 M F`` is real already
    because ``M`` commutes with conjugation, ``Re`` only drops rounding."""
    if k < 0:
        raise ValueError(f"low-pass window k={k}: must be >= 0")
    if k >= n:
        return np.eye(n)
    t = np.arange(n)
    whole, pair = kept_frequencies(n, k)
    # sum over kept f of e^{2πi f (t - s) / n} / n, plus the cosine half of the ±k/2 pair
    diff = t[:, None] - t[None, :]
    mat = sum(np.cos(2 * np.pi * f * diff / n) for f in whole) / n if whole else np.zeros((n, n))
    if pair is not None:
        weight = 1.0 if 2 * pair == n else 2.0  # Nyquist: one real coefficient; else the pair's cos part
        mat = mat + weight * np.cos(2 * np.pi * pair * t[:, None] / n) * np.cos(2 * np.pi * pair * t[None, :] / n) / n
    return mat


def _apply(x: torch.Tensor, k: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    lh = torch.from_numpy(lowpass_matrix(h, k)).to(x.device, torch.float64)
    lw = torch.from_numpy(lowpass_matrix(w, k)).to(x.device, torch.float64)
    return (lh @ x.to(torch.float64) @ lw.T).to(x.dtype)  # float64: the filter is exact to ~1e-15


def lowpass(x: torch.Tensor, k: int) -> torch.Tensor:
    """k x k low-pass of every channel of ``x`` [..., H, W] (same dtype and device)."""
    return _apply(x, k)


def highpass(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x - lowpass(x, k)``: the k x k lowest frequencies removed."""
    return x - _apply(x, k)


def energy_kept(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-channel ``|y|^2 / |x|^2`` [..., C] (1 for an all-zero channel: nothing was lost)."""
    num = y.double().pow(2).sum((-2, -1))
    den = x.double().pow(2).sum((-2, -1))
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.ones_like(den)).float()


def rank_tolerance(s_max: float, h: int, w: int) -> float:
    """Singular values at or below this count as zero: ``s_max · max(H, W) · eps(float64)`` (numpy's
    ``matrix_rank`` default), so only rounding-level components are ignored."""
    return s_max * max(h, w) * np.finfo(np.float64).eps


def numeric_rank(x: np.ndarray) -> np.ndarray:
    """Numeric rank of every channel of ``x`` [..., H, W]: float64 SVD, singular values above
    ``rank_tolerance`` counted (the paper's hypothesis check)."""
    a = np.asarray(x, np.float64)
    s = np.linalg.svd(a, compute_uv=False)
    smax = s[..., :1]
    tol = smax * max(a.shape[-2:]) * np.finfo(np.float64).eps
    return (s > tol).sum(-1)


def rank_check(x: torch.Tensor, ks: list[int]) -> list[dict]:
    """For each k: measured numeric rank of the low-pass images ``x`` [N, C, H, W] per channel (max and mean
    over images) and whether every one is <= k, the appendix's bound."""
    rows = []
    for k in ks:
        ranks = numeric_rank(lowpass(x.double().cpu(), k).numpy())  # [N, C]
        rows.append({"k": int(k), "images": int(ranks.shape[0]), "max_rank": ranks.max(0).tolist(),
                     "mean_rank": [round(float(r), 3) for r in ranks.mean(0)],
                     "bound_holds": bool((ranks <= k).all())})
    return rows
