"""Deterministic natural-looking images for the demo, the tests and the benchmarks.

Uniform noise has a flat singular value spectrum and hides precision loss in SVD code, so everything here
has the steep spectral decay of photographs: smooth colour gradients, soft shapes and 1/f ("pink") texture.
Each class gets its own palette, shape and gradient direction, so a small network can learn the classes.
"""
from __future__ import annotations

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


def pink_noise(rng: np.random.Generator, shape: tuple[int, ...], exponent: float = 1.0) -> np.ndarray:
    """Noise whose amplitude spectrum falls as 1/f**exponent over the last two axes, scaled to [0, 1]."""
    *lead, h, w = shape
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0 / max(h, w)  # keep the mean finite and modest
    spec = rng.standard_normal((*lead, h, w // 2 + 1)) + 1j * rng.standard_normal((*lead, h, w // 2 + 1))
    img = np.fft.irfft2(spec / f**exponent, s=(h, w))
    lo = img.min(axis=(-2, -1), keepdims=True)
    hi = img.max(axis=(-2, -1), keepdims=True)
    return (img - lo) / np.maximum(hi - lo, 1e-12)


def _shape_mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: np.ndarray, cx: np.ndarray,
                r: np.ndarray) -> np.ndarray:
    """Soft-edged masks [N, H, W] for five shape families (disc, square, ring, diamond, stripes)."""
    dy, dx = yy - cy, xx - cx
    if kind == 0:
        d = np.sqrt(dy**2 + dx**2) - r
    elif kind == 1:
        d = np.maximum(np.abs(dy), np.abs(dx)) - r
    elif kind == 2:
        d = np.abs(np.sqrt(dy**2 + dx**2) - r) - 0.35 * r
    elif kind == 3:
        d = np.abs(dy) + np.abs(dx) - 1.3 * r
    else:
        d = 0.1 * np.sin((dy + dx) / np.maximum(r, 1e-6) * 3.0)
    return 1.0 / (1.0 + np.exp(np.clip(30.0 * d, -50, 50)))  # soft edge ~1/30 of the image: keeps the spectrum steep


def class_images(label: int, n: int, size: tuple[int, int] = (32, 32), seed: int = 0,
                 num_classes: int = 10) -> np.ndarray:
    """``n`` images of class ``label`` as uint8 [n, H, W, 3]; the same arguments give the same pixels."""
    h, w = size
    rng = np.random.default_rng([seed, label, n, h, w])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy[None] / h, xx[None] / w
    hue = 2 * np.pi * label / num_classes
    base = 0.5 + 0.35 * np.cos(hue + np.array([0.0, 2.1, 4.2]))          # class palette, RGB
    accent = 0.5 - 0.35 * np.cos(hue + np.array([1.0, 3.1, 5.2]))
    angle = hue + rng.normal(0, 0.3, size=(n, 1, 1))
    grad = 0.5 + 0.5 * np.sin(2 * np.pi * (np.cos(angle) * yy + np.sin(angle) * xx) * 0.5)
    cy = rng.uniform(0.3, 0.7, size=(n, 1, 1))
    cx = rng.uniform(0.3, 0.7, size=(n, 1, 1))
    r = rng.uniform(0.15, 0.3, size=(n, 1, 1))
    mask = _shape_mask(label % 5, yy, xx, cy, cx, r)
    texture = pink_noise(rng, (n, 3, h, w), exponent=1.2)
    img = (
        base[None, :, None, None] * (0.6 + 0.4 * grad[:, None])
        + (accent - base)[None, :, None, None] * mask[:, None] * (0.7 + 0.3 * (label >= 5))
        + 0.2 * (texture - 0.5)
    )
    img = np.clip(img, 0.0, 1.0).transpose(0, 2, 3, 1)
    return np.round(img * 255).astype(np.uint8)


def labelled_images(num_per_class: int, size: tuple[int, int] = (32, 32), seed: int = 0,
                    num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Images [N, H, W, 3] uint8 and labels [N] int64, classes interleaved (source order 0,1,..,9,0,1,..)."""
    per_class = [class_images(c, num_per_class, size, seed, num_classes) for c in range(num_classes)]
    images = np.stack(per_class, axis=1).reshape(-1, *size, 3)
    labels = np.tile(np.arange(num_classes, dtype=np.int64), num_per_class)
    return images, labels


def natural_batch(n: int, channels: int = 3, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """A float64 batch [n, C, H, W] in [0, 1] with natural-image spectra, for engine tests and benchmarks."""
    images, _ = labelled_images(-(-n // 10), size, seed)
    x = images[:n].transpose(0, 3, 1, 2).astype(np.float64) / 255.0
    return x[:, :channels]
