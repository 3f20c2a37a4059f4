"""Decoding of shard members back into arrays (the inverse of ``variants.MEMBER_ENCODERS``)."""
from __future__ import annotations

import io
import json
import math

import numpy as np
from PIL import Image

from rankshard.preprocess.errors import RankshardError


_NPY_V1 = b"\x93NUMPY\x01\x00"
_HEADERS: dict[bytes, tuple] = {}  # header bytes -> (shape, fortran order, dtype, item count, data offset)
_HEADERS_MAX = 256  # distinct (dtype, shape) headers remembered; a shard of one variant has a handful


def decode_npy(data: bytes) -> np.ndarray:
    """An ``.npy`` member as a (writable) array; object arrays are refused, so a member never runs code.

    ``np.load`` spends ~100 us per call parsing the header text (measured: 135-180 us for a 43-150 KB member
    against 27-35 us here); our members repeat a few headers (``variants.npy_bytes`` writes them
    deterministically), so a version 1.0 header is parsed once and remembered. Anything else goes to
    ``np.load(allow_pickle=False)``.
    """
    if data[:8] == _NPY_V1 and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        header = data[:end]
        known = _HEADERS.get(header)
        if known is None:
            f = io.BytesIO(header)
            np.lib.format.read_magic(f)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            if dtype.hasobject:
                raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
            if any(n < 0 for n in shape):  # np.load's rule; here a -1 read whatever bytes were there
                raise ValueError(f"negative dimensions are not allowed (shape {shape})")
            known = (shape, fortran, dtype, math.prod(shape), end)
            if len(_HEADERS) < _HEADERS_MAX:
                _HEADERS[header] = known
        shape, fortran, dtype, count, offset = known
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        return (flat.reshape(shape[::-1]).transpose() if fortran else flat.reshape(shape)).copy()
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


def decoded(decode, members: dict[str, bytes], where: str, key: str):
    """``decode(members)`` for a tool that stops at a damaged sample (preview; the loaders skip or name it, and
    ``verify`` reports it): any failure becomes a RankshardError naming ``where`` (its shard or variant folder),
    the key, and how to find the others."""
    try:
        return decode(members)
    except Exception as exc:  # PIL, numpy, a missing member: every way a damaged sample fails to decode
        raise RankshardError(f"{where}: sample {key} does not decode ({type(exc).__name__}: {exc}); "
                             "`rankshard-preprocess verify` names every damaged shard: delete those and rerun the "
                             "preprocess command") from None

class LabelMismatch(ValueError):
    """The sample's ``.cls`` and ``.json`` disagree: one of them was damaged after materialization."""


def sample_label(members: dict[str, bytes]) -> int:
    """The ``.cls`` label, cross-checked against the label in ``.json`` (both are written from one value, so
    a difference means a flipped byte that would otherwise train on a wrong label without a word). The one
    label rule of the loaders and ``verify``."""
    if "cls" not in members:
        raise KeyError(f"no .cls member (found {sorted(members)})")
    label = int(members["cls"])
    if "json" in members:
        recorded = json.loads(members["json"]).get("label")
        if recorded is not None and recorded != label:
            raise LabelMismatch(f"label mismatch: .cls says {label}, .json says {recorded} (a damaged member)")
    return label
