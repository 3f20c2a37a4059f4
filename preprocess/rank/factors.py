"""Stored top-K factors back to a rank-k image: the one home of the reconstruction formula.

A ``factors-K`` variant keeps, per sample and channel, ``U [C, H, K]``, ``s [C, K]`` and ``V [C, W, K]``
(float16; V is stored with its singular vectors as columns, like U). Every reader goes through
``reconstruct``: the loaders' worker decode (``loaders.decode``), the on-device path (a GPU batch of
factors, ``LoaderConfig(reconstruct_on=...)``), ``verify``/``preview``/``rig`` (``format.codec``) and any
training loop that takes the factors itself.

    x_k = sum_{j < k} s_j u_j v_j^T    per channel, for any 0 <= k <= K
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class Factors(NamedTuple):
    """A batch (or one sample) of stored factors: ``u [..., H, K]``, ``s [..., K]``, ``v [..., W, K]``."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor


def check_factors(u, s, v, k: int | None) -> int:
    """The rank to use (default K), after checking that the shapes fit together (torch or numpy)."""
    K = s.shape[-1]
    if u.ndim != s.ndim + 1 or v.ndim != s.ndim + 1 or u.shape[-1] != K or v.shape[-1] != K \
            or u.shape[:-2] != s.shape[:-1] or v.shape[:-2] != s.shape[:-1]:
        raise ValueError(f"factors do not fit together: u {tuple(u.shape)}, s {tuple(s.shape)}, v {tuple(v.shape)} "
                         "(expected u [..., H, K], s [..., K], v [..., W, K])")
    k = K if k is None else int(k)
    if not 0 <= k <= K:
        raise ValueError(f"rank {k} asked of factors that keep only {K} components (0 <= k <= {K})")
    return k


def reconstruct(u, s, v, k: int | None = None, device: str | torch.device | None = None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``x_k = sum_{j<k} s_j u_j v_j^T`` per matrix, as a ``dtype`` tensor ``[..., H, W]`` on ``device``.

    ``u [..., H, K]``, ``s [..., K]``, ``v [..., W, K]`` are torch tensors or numpy arrays (float16 as stored,
    or any float type), with any leading axes (``[N, C, ...]`` for a batch, ``[C, ...]`` for one sample).
    ``k`` (default K) may be anything from 0 (zeros) to K. ``device`` defaults to where ``u`` is: the first
    ``k`` components are sliced, moved (float16: half the bytes of float32), converted to ``dtype`` and
    multiplied there, so a GPU does the work for a batch of factors handed over by the loader.
    """
    u, s, v = (torch.as_tensor(t) for t in (u, s, v))
    k = check_factors(u, s, v, k)
    device = u.device if device is None else torch.device(device)
    # non-blocking only towards a GPU (queued before the matmul on its stream); a copy to the host must have
    # landed before the CPU multiplies
    u, s, v = (t[..., :k].to(device, non_blocking=device.type == "cuda").to(dtype) for t in (u, s, v))
    # [..., H, k] * [..., 1, k] @ [..., k, W]: one batched matmul (k = 0 gives zeros)
    return torch.matmul(u * s.unsqueeze(-2), v.transpose(-1, -2))


def reconstruct_numpy(u: np.ndarray, s: np.ndarray, v: np.ndarray, k: int | None = None) -> np.ndarray:
    """``reconstruct`` on the CPU for numpy callers: float32 ``[..., H, W]`` as a numpy array."""
    return reconstruct(u, s, v, k, device="cpu").numpy()
