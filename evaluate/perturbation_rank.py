"""The rank structure of an adversarial perturbation ``delta = x_adv - x`` (``pgd --delta-rank``).

The paper asks how input rank relates to robustness; this measures the attack's side of it, per sample, in
float64, pooled over channels (each channel weighted by its share of delta's energy):

* ``spectrum[k-1]``  -- energy retained by delta's own rank-k truncation, ``sum_c sum_{j<=k} s_cj(delta)^2 /
  ||delta||^2``: how low-rank the perturbation itself is;
* ``in_image[k-1]``  -- the share of delta's energy inside the image's own top-k singular subspaces,
  ``sum_c ||U_ck^T delta_c V_ck||^2 / ||delta||^2`` (U_k, V_k: the k leading left / right singular vectors of
  channel c of the clean image): how much of the attack lies where a rank-k image lives. A perturbation with
  no structure (any isotropic distribution) has expectation ``k^2 / (H W)`` here, drawn as the reference;
* ``effective_rank`` -- Roy & Vetterli (2007): ``exp(H(p))`` with ``p = s / sum(s)``, per channel, averaged;
* ``stable_rank``    -- ``||delta_c||_F^2 / s_c1^2``, per channel, averaged.

k runs over 1..min(H, W). Beyond the clean image's numerical rank its singular vectors are not unique, so
``in_image`` is only meaningful up to that rank (natural photos are full rank). Channels where delta is zero
are left out of the channel averages; a sample whose delta is zero everywhere has NaN throughout.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

CURVES = ("spectrum", "in_image")
SCALARS = ("effective_rank", "stable_rank")


def rank_profile(x: torch.Tensor, adv: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample curves ``spectrum`` and ``in_image`` ([B, min(H, W)]) and scalars ``effective_rank`` and
    ``stable_rank`` ([B]) of ``adv - x`` for images ``x`` [B, C, H, W]; float64 numpy arrays."""
    x64 = x.detach().to(torch.float64)
    delta = adv.detach().to(torch.float64) - x64
    s = torch.linalg.svdvals(delta)                                   # [B, C, n]
    total = (delta ** 2).sum(dim=(1, 2, 3))                           # [B]
    u, _, vh = torch.linalg.svd(x64)                                  # full bases: u [B, C, H, H], vh [B, C, W, W]
    coeff = (u.mT @ delta @ vh.mT) ** 2                               # delta's energy in the image's basis pairs
    n = s.shape[-1]
    diag = torch.arange(n, device=x.device)
    # the top-k x top-k block of the coefficients, for every k at once: a 2-D cumulative sum read on the diagonal
    block = coeff.sum(1).cumsum(1).cumsum(2)[:, diag, diag]          # [B, n]
    share = (s ** 2).sum(1).cumsum(-1)                               # [B, n]
    zero = total == 0
    denom = torch.where(zero, torch.nan, total)[:, None]
    channel = s.sum(-1) > 0                                          # [B, C]: channels the attack changed
    p = s / torch.where(channel, s.sum(-1), torch.nan)[..., None]
    entropy = -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(-1)  # 0 log 0 = 0
    stable = (s ** 2).sum(-1) / torch.where(channel, s[..., 0] ** 2, torch.nan)
    return {"spectrum": (share / denom).cpu().numpy(), "in_image": (block / denom).cpu().numpy(),
            "effective_rank": _nanmean(torch.where(channel, entropy.exp(), torch.nan)),
            "stable_rank": _nanmean(stable)}


def _nanmean(t: torch.Tensor) -> np.ndarray:
    """Mean over channels of the defined ones; NaN (without numpy's warning) where none is."""
    a = t.cpu().numpy()
    count = np.isfinite(a).sum(-1)
    return np.where(count > 0, np.nansum(a, -1) / np.maximum(count, 1), np.nan)


def isotropic_in_image(height: int, width: int) -> np.ndarray:
    """E[in_image(k)] for delta drawn from any isotropic distribution: the k*k-dimensional block's share of the
    H*W dimensions, ``k^2 / (H W)``, k = 1..min(H, W)."""
    k = np.arange(1, min(height, width) + 1, dtype=np.float64)
    return k ** 2 / (height * width)


def summarize(records: Mapping[str, dict]) -> dict:
    """Means over the samples with a nonzero delta: each curve per k and each scalar, with the count used."""
    rows = [r for r in records.values() if np.isfinite(r["delta_spectrum"]).all()]
    out: dict = {"samples": len(rows)}
    for name in CURVES:
        curves = np.array([r[f"delta_{name}"] for r in rows], dtype=np.float64)
        out[name] = [round(float(v), 8) for v in curves.mean(0)] if rows else []
    for name in SCALARS:
        vals = [r[f"delta_{name}"] for r in rows if np.isfinite(r[f"delta_{name}"])]
        out[name] = float(np.mean(vals)) if vals else float("nan")
    return out


def record_fields(profile: dict[str, np.ndarray], i: int) -> dict:
    """Sample ``i``'s share of ``rank_profile``'s output, as record fields ``delta_<name>``."""
    return {f"delta_{name}": profile[name][i] for name in CURVES} | \
           {f"delta_{name}": float(profile[name][i]) for name in SCALARS}


def save_curves(path: Path, records: Mapping[str, dict]) -> Path:
    """Every sample's curves in one ``.npz`` (written whole or not at all): ``keys`` [N], ``spectrum`` and
    ``in_image`` [N, min(H, W)], float64."""
    keys: Sequence[str] = list(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, keys=np.array(keys), **{name: np.array([records[k][f"delta_{name}"] for k in keys])
                                             for name in CURVES})
    os.replace(tmp, path)
    return path
