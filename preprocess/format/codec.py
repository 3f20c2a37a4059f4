"""Decoding of shard members back into arrays (the inverse of ``variants.MEMBER_ENCODERS``)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode_npy(data: bytes) -> np.ndarray:
    # allow_pickle=False: an .npy member must never be able to run code
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def decode_image(members: dict[str, bytes]) -> np.ndarray:
    """A sample's image as float32 HWC on the [0, 1] scale, whichever encoding stored it."""
    if "png" in members:
        return decode_png(members["png"]).astype(np.float32) / 255.0
    if "npy" in members:
        image = decode_npy(members["npy"])
        return image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)  # raw / npy
    if "u.npy" in members:
        from rankshard.preprocess.rank.factors import reconstruct_numpy  # torch, only for factors variants

        return reconstruct_numpy(*(decode_npy(members[k]) for k in ("u.npy", "s.npy", "v.npy"))).transpose(1, 2, 0)
    raise KeyError(f"sample has no image member (found {sorted(members)})")
