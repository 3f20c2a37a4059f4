"""A vectorized PNG encoder for batches of uint8 RGB images.

PIL spends most of a small image's encode time in per-call machinery. Here the Paeth filter, which
uses only original pixel values, is computed for a whole batch at once in numpy, leaving one
``zlib.compress`` per image. The output is a standard 8-bit RGB PNG that any decoder reads.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAETH = 4


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def paeth_filtered(images: np.ndarray) -> np.ndarray:
    """PNG scanlines [N, H, 1 + W*3] with filter type 4 (Paeth) for uint8 images [N, H, W, 3]."""
    x = images.astype(np.int16)
    a = np.zeros_like(x)
    a[:, :, 1:] = x[:, :, :-1]          # left
    b = np.zeros_like(x)
    b[:, 1:] = x[:, :-1]                # above
    c = np.zeros_like(x)
    c[:, 1:, 1:] = x[:, :-1, :-1]       # upper left
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    n, h, w, _ = images.shape
    lines = np.empty((n, h, 1 + 3 * w), dtype=np.uint8)
    lines[:, :, 0] = _PAETH
    lines[:, :, 1:] = ((x - pred) & 0xFF).astype(np.uint8).reshape(n, h, 3 * w)
    return lines


def encode_png_batch(images: np.ndarray, level: int) -> list[bytes]:
    """Encode uint8 RGB images [N, H, W, 3] as PNG files, zlib level ``level`` (0-9)."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    header = _SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    end = _chunk(b"IEND", b"")
    lines = paeth_filtered(images)
    return [header + _chunk(b"IDAT", zlib.compress(lines[i].tobytes(), level)) + end for i in range(n)]
