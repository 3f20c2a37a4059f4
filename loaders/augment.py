"""Batched augmentations in torch (torchvision does not import with the CPU torch used here).

Every random choice is drawn from one CPU ``torch.Generator`` per batch (seeded by the plan), so a batch
augments identically in a worker or on the GPU, with any number of workers, and after a resume.
Crops, flips, zero padding and bilinear resizing are linear maps ``A -> L A R`` per channel, so an image
of rank k stays rank <= k (SPEC "Rank semantics"); nothing here normalizes (models do that inside).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

CIFAR_PAD = 4                      # pixels of zero padding before the random crop (torchvision's padding=4)
RRC_SCALE = (0.08, 1.0)            # RandomResizedCrop: share of the image area
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop: aspect ratio w / h
RRC_ATTEMPTS = 10


def _flip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cifar(x: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Zero-pad by 4, take a random ``size`` crop per image, flip half of them (torchvision's recipe).

    One gather does all three (a flipped crop reads its columns backwards), on any dtype: the loaders
    run it on uint8 batches, before the float conversion, which moves 4x fewer bytes.
    """
    n, _, h, w = x.shape
    oy = torch.randint(0, h + 2 * CIFAR_PAD - size[0] + 1, (n,), generator=g)
    ox = torch.randint(0, w + 2 * CIFAR_PAD - size[1] + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cols = torch.arange(size[1])
    cols = torch.where(flip[:, None], size[1] - 1 - cols, cols)
    rows = (oy[:, None] + torch.arange(size[0])).to(x.device)
    cols = (ox[:, None] + cols).to(x.device)
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, CIFAR_PAD, CIFAR_PAD, CIFAR_PAD, CIFAR_PAD))  # NHWC
    ix = torch.arange(n, device=x.device)[:, None, None]
    # advanced indices on N, H, W: result is [n, size_h, size_w, C]
    return padded[ix, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def rrc_params(height: int, width: int, g: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params`` (same draws in the same order): (top, left, h, w)."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=g).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=g)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=g).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=g).item()
            return i, j, h, w
    # fallback: the largest central crop whose aspect ratio lies within ``ratio``
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(x: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop ``box`` (top, left, h, w) of [C,H,W] ``x`` and resize bilinearly (antialiased, as torchvision)."""
    i, j, h, w = box
    crop = x[None, :, i:i + h, j:j + w].float()  # only the crop is converted (uint8 input: 0..255 scale kept)
    if (h, w) == tuple(size):
        return crop[0]
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def imagenet(x: torch.Tensor, size: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) then RandomHorizontalFlip, per image.

    Draws in torchvision's order (crop box, then flip coin, image after image), so a per-sample
    torchvision pipeline on the same generator picks the same boxes. The flip is applied to the crop
    before resizing (the resize kernel is symmetric, so they commute) while it is still small.
    """
    _, c, h, w = x.shape
    out = torch.empty(len(x), c, *size, device=x.device, dtype=torch.float32)  # same scale as x (0..255 for uint8)
    for n in range(len(x)):
        i, j, bh, bw = rrc_params(h, w, g)
        crop = x[n, :, i:i + bh, j:j + bw]
        if torch.rand(1, generator=g).item() < 0.5:
            crop = crop.flip(-1)
        out[n] = resized_crop(crop, (0, 0, bh, bw), size)
    return out


def center(x: torch.Tensor, size: tuple[int, int], g: torch.Generator | None = None) -> torch.Tensor:
    """Central ``size`` crop (identity when ``size`` is the stored size)."""
    h, w = x.shape[-2:]
    if size[0] > h or size[1] > w:
        raise ValueError(f"crop {size} is larger than the stored images {h}x{w}")
    top, left = (h - size[0]) // 2, (w - size[1]) // 2
    return x[..., top:top + size[0], left:left + size[1]]


# Augmentations that accept uint8 batches and keep their 0..255 scale (the loaders divide once, after):
# converting only what survives the crop is cheaper than converting whole stored images.
UINT8_INPUT = frozenset({"none", "cifar", "imagenet"})

AUGMENTS: dict[str, Callable[[torch.Tensor, tuple[int, int], torch.Generator], torch.Tensor]] = {
    "none": center, "cifar": cifar, "imagenet": imagenet,
}
