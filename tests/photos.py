"""Real photographs for numeric tests: scikit-image's bundled images (shipped in its wheel, no download)."""
from __future__ import annotations

import numpy as np
import pytest


def photo(name: str) -> np.ndarray:
    """``skimage.data.<name>()`` as uint8 [H, W, 3]: grey and binary images repeated over three channels."""
    data = pytest.importorskip("skimage.data")
    a = np.asarray(getattr(data, name)())
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    return np.repeat(a[..., None], 3, -1) if a.ndim == 2 else a[..., :3]


def photo_batch(names, side: int) -> np.ndarray:
    """The photos resized (bicubic) to side x side, float32 [N, 3, side, side] in [0, 1]."""
    from PIL import Image

    imgs = [np.asarray(Image.fromarray(photo(n)).resize((side, side), Image.BICUBIC)) for n in names]
    return np.stack(imgs).transpose(0, 3, 1, 2).astype(np.float32) / 255
