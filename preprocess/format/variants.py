"""The variants of a materialization and how each one encodes a sample into tar members."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np

from rankshard.preprocess.format.pngenc import encode_png_batch

# png: uint8, zlib-compressed; raw: the same uint8 pixels as an uncompressed .npy (no zlib cost, larger
# files); npy: float16 (needed where values leave [0, 1])
ENCODINGS = ("png", "npy", "raw")


@dataclass(frozen=True)
class Variant:
    """One output folder: ``full``, ``rank-005``, ``high-002``, ``factors-020``, ``spectra``, ``lowpass-008``
    or ``highpass-008`` (k x k lowest 2-D DFT frequencies kept / removed, ``preprocess.rank.lowpass``)."""

    mode: str            # "full" | "low" | "high" | "factors" | "spectra" | "lowpass" | "highpass"
    rank: int | None     # k for low/high/factors/lowpass/highpass; None for full/spectra
    encoding: str        # "png" | "npy" | "raw" | "factors" | "spectra"

    @property
    def name(self) -> str:
        prefix = {"low": "rank", "high": "high", "factors": "factors", "lowpass": "lowpass", "highpass": "highpass"}
        if self.mode in prefix:
            return f"{prefix[self.mode]}-{self.rank:03d}"
        return self.mode


def variants_for(ranks, high, factors, spectra, encoding, lowpass=(), highpass=()) -> list[Variant]:
    """All variants of one materialization, in a fixed order. High rank and high-pass can be negative, so they
    are npy. Frequency variants come last: without them the list (and every shard) is what it always was."""
    out = [Variant("full", None, encoding)]
    out += [Variant("low", k, encoding) for k in sorted(set(ranks))]
    out += [Variant("high", k, "npy") for k in sorted(set(high))]
    if factors:
        out.append(Variant("factors", int(factors), "factors"))
    if spectra:
        out.append(Variant("spectra", None, "spectra"))
    out += [Variant("lowpass", k, encoding) for k in sorted(set(lowpass))]
    out += [Variant("highpass", k, "npy") for k in sorted(set(highpass))]
    return out


def recorded_variants(config: dict) -> list[str]:
    """The variant folders a recorded configuration makes (the ``config`` of a manifest or of
    ``.rankshard-config.json``): where a split cannot be listed (HTTP), it says which folders to look for."""
    return [v.name for v in variants_for(config["ranks"], config["high"], config.get("factors"),
                                         config.get("spectra", True), config["encoding"],
                                         config.get("lowpass", ()), config.get("highpass", ()))]


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` output in memory (its header is deterministic for a given dtype and shape)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


PNG_CHUNK = 32  # images per vectorized PNG call: its int16 temporaries take ~18x the uint8 input


def _image_members(payload: dict, level: int) -> list[dict[str, bytes]]:
    images = payload["image"]
    if images.dtype == np.uint8:
        return [{"png": png} for i in range(0, len(images), PNG_CHUNK)
                for png in encode_png_batch(images[i:i + PNG_CHUNK], level)]
    return [{"npy": npy_bytes(img)} for img in images]


def _raw_members(payload: dict, level: int) -> list[dict[str, bytes]]:
    return [{"npy": npy_bytes(img)} for img in payload["image"]]  # uint8 HWC, uncompressed


def _factors_members(payload: dict, level: int) -> list[dict[str, bytes]]:
    return [{"u.npy": npy_bytes(u), "s.npy": npy_bytes(s), "v.npy": npy_bytes(v)}
            for u, s, v in zip(payload["u"], payload["s"], payload["v"])]


def _spectra_members(payload: dict, level: int) -> list[dict[str, bytes]]:
    return [{"s.npy": npy_bytes(s)} for s in payload["s"]]


# How a variant's payload arrays become the data members of each sample, for a whole shard at once.
MEMBER_ENCODERS: dict[str, Callable[[dict, int], list[dict[str, bytes]]]] = {
    "png": _image_members, "npy": _image_members, "raw": _raw_members, "factors": _factors_members,
    "spectra": _spectra_members,
}


def shard_samples(variant: Variant, payload: dict, meta: dict, png_level: int):
    """``(key, members)`` for every sample of one shard of one variant: data members, ``cls`` and ``json``."""
    data = MEMBER_ENCODERS[variant.encoding](payload, png_level)
    for i, members in enumerate(data):
        members["cls"] = str(int(meta["label"][i])).encode()
        record = {
            "index": int(meta["index"][i]), "source": meta["source"][i], "label": int(meta["label"][i]),
            "class_name": meta["class_name"][i], "rank": variant.rank, "mode": variant.mode,
            "height": int(meta["height"]), "width": int(meta["width"]),
            "energy": [round(float(e), 6) for e in payload["energy"][i]],
            "clip_fraction": round(float(payload["clip_fraction"][i]), 6),
        }
        members["json"] = json.dumps(record, sort_keys=True).encode()
        yield meta["key"][i], members
