"""Shard members -> (image HWC array, label): one decoder per encoding, chosen from a dict.

PNG stays uint8 until the batch is on its way to the model (4x less to copy between processes than
float32); npy and factors are float. ``factors`` reconstructs ``x_k = sum_{j<=k} s_j u_j v_j^T`` from
the stored top-K factors, at any k <= K, with ``preprocess.rank.factors.reconstruct`` (the formula's one
home; the loaders call it per batch, in the workers or on the device, see ``pipeline.collate``).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from rankshard.preprocess.format.codec import decode_npy, decode_png, sample_label
from rankshard.preprocess.rank.factors import check_factors, reconstruct_numpy


def _png(members: dict[str, bytes], k: int | None) -> np.ndarray:
    return decode_png(members["png"])


def _npy(members: dict[str, bytes], k: int | None) -> np.ndarray:
    return decode_npy(members["npy"]).astype(np.float32)


def _raw(members: dict[str, bytes], k: int | None) -> np.ndarray:
    image = decode_npy(members["npy"])
    if image.dtype != np.uint8:
        raise ValueError(f"a raw-encoded sample holds uint8 pixels, this one {image.dtype}")
    return image  # stays uint8, like png: divided by 255 once the batch is on its way to the model


def decode_factors(members: dict[str, bytes], k: int | None,
                   size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored float16 ``u [C,H,k]``, ``s [C,k]``, ``v [C,W,k]``: the first ``k`` (default all K) components;
    with ``size`` (H, W), checked to be factors of a 3-channel image of that size."""
    u, s, v = (decode_npy(members[m]) for m in ("u.npy", "s.npy", "v.npy"))
    k = check_factors(u, s, v, k)  # per sample, so a bad one is skipped (on_error) with its key, not a batch
    if any(t.dtype != np.float16 for t in (u, s, v)):
        raise ValueError(f"a factors sample holds float16 u, s, v; this one {u.dtype}, {s.dtype}, {v.dtype}")
    if size is not None and (u.shape[:2], v.shape[:2]) != ((3, size[0]), (3, size[1])):
        raise ValueError(f"factors u {u.shape}, v {v.shape} are not those of a 3x{size[0]}x{size[1]} image (the "
                         "manifest's size)")
    return u[..., :k], s[..., :k], v[..., :k]


def _factors(members: dict[str, bytes], k: int | None) -> np.ndarray:
    return reconstruct_numpy(*decode_factors(members, k)).transpose(1, 2, 0)  # CHW -> HWC


DECODERS: dict[str, Callable[[dict[str, bytes], int | None], np.ndarray]] = {
    "png": _png, "npy": _npy, "raw": _raw, "factors": _factors,
}




def decode_sample(members: dict[str, bytes], encoding: str, k: int | None = None, unreconstructed: bool = False,
                  size: tuple[int, int] | None = None) -> tuple[np.ndarray | tuple[np.ndarray, ...], int]:
    """The image (HWC; uint8 for png/raw, float32 otherwise) and the checked integer label of one sample;
    with ``unreconstructed``, a factors sample's stored ``(u, s, v)`` instead (see ``decode_factors``). With
    ``size`` (the manifest's H, W), a sample of another shape is refused here: it would otherwise fail the
    batch's stacking as a bare numpy error, or pass whole batches of a wrong size on."""
    label = sample_label(members)
    if unreconstructed and encoding == "factors":
        return decode_factors(members, k, size), label
    image = DECODERS[encoding](members, k)
    if size is not None and image.shape != (*size, 3):
        raise ValueError(f"a {'x'.join(map(str, image.shape))} image where the manifest says {size[0]}x{size[1]}x3")
    return image, label
