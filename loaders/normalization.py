"""Per-dataset normalization defaults (mean, std per RGB channel, on the [0, 1] scale).

Loaders never normalize (models normalize inside, so attacks work in pixel space); these are the
defaults a trainer passes to the model. Duplicated from the usual published values on purpose: loaders
imports nothing from train.
"""
from __future__ import annotations

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}


def normalization_for(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CIFAR-10 statistics for ``cifar*`` datasets, ImageNet statistics for everything else."""
    key = "cifar10" if dataset.lower().startswith("cifar") else "imagenet"
    return NORMALIZATION[key]
