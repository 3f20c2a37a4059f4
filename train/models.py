"""ResNets written in the project, with torchvision's exact state-dict key names and shapes.

torchvision does not import with the CPU torch build used here, yet checkpoints must interchange with it
(and with MadryLab ``robustness``), so the layout is reproduced key for key:

* ``variant="imagenet"``: torchvision's ResNet v1.5 (7x7/2 stem conv, 3x3/2 max-pool, the stride of a
  Bottleneck on its 3x3 conv), keys ``conv1``, ``bn1``, ``layer1..4.<i>.{conv,bn}<j>``,
  ``layer<n>.0.downsample.{0,1}``, ``fc``.
* ``variant="cifar"``: the MadryLab ``robustness`` CIFAR ResNets: 3x3/1 stem conv, no max-pool, same
  blocks; their ``shortcut``/``linear`` names are mapped to ``downsample``/``fc`` when loading
  (``rankshard.train.checkpoint``), so the module tree here is the same for both variants.

Models take inputs in [0, 1] and normalize inside (non-persistent ``mean``/``std`` buffers, so the
state dict stays exactly torchvision's); attacks and attributions then work in pixel space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

# One source of truth for dataset statistics: the loaders' (which the trainer stores in checkpoints).
# MadryLab checkpoints carry their own normalizer buffers (their CIFAR std is 0.2023/0.1994/0.2010),
# which checkpoint loading reads from the file; these defaults only fill in for plain state dicts.
from rankshard.loaders.normalization import CIFAR10_MEAN, CIFAR10_STD, IMAGENET_MEAN, IMAGENET_STD

VARIANTS = ("imagenet", "cifar")
INPUT_SIZE = {"imagenet": 224, "cifar": 32}  # pixels (square side) each stem was designed for


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); ``downsample`` is a 1x1 conv + BN when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride: torchvision v1.5), 1x1 expand by 4 (ResNet-50/101)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


@dataclass(frozen=True)
class ArchSpec:
    """A ResNet depth: block type (key of ``BLOCKS``) and blocks per stage."""

    block: str
    layers: tuple[int, int, int, int]


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2, 2)),
    "resnet34": ArchSpec("basic", (3, 4, 6, 3)),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3)),
    "resnet101": ArchSpec("bottleneck", (3, 4, 23, 3)),
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model (checkpoints store these fields). ``mean``/``std`` default to
    ``default_normalization(variant)``: ImageNet statistics for the imagenet stem, CIFAR-10's for cifar."""

    arch: str
    variant: str = "imagenet"
    num_classes: int = 1000
    width: int = 64  # base channels: torchvision's 64; tests use 4-8 to train on CPU in seconds
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    zero_init_residual: bool = False

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {sorted(ARCHS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.num_classes < 1 or self.width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {self.num_classes}, {self.width}")
        dmean, dstd = default_normalization(self.variant)
        mean = tuple(float(v) for v in (dmean if self.mean is None else self.mean))
        std = tuple(float(v) for v in (dstd if self.std is None else self.std))
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean/std need 3 values (RGB) and std > 0, got {mean}, {std}")
        object.__setattr__(self, "mean", mean)  # frozen: resolve the defaults once, here
        object.__setattr__(self, "std", std)


def default_normalization(variant: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std conventionally paired with a stem: ImageNet's for ``imagenet``, CIFAR-10's for ``cifar``."""
    return (IMAGENET_MEAN, IMAGENET_STD) if variant == "imagenet" else (CIFAR10_MEAN, CIFAR10_STD)


def _stem(variant: str, width: int) -> tuple[nn.Conv2d, nn.Module]:
    """The input stem: conv1 and the pooling after bn1/relu (identity for CIFAR, which keeps 32x32 detail)."""
    if variant == "imagenet":
        return nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.MaxPool2d(3, stride=2, padding=1)
    return nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.Identity()


class ResNet(nn.Module):
    """ResNet on [0, 1] inputs; ``state_dict()`` keys and shapes equal torchvision's for the same arch."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        arch = ARCHS[spec.arch]
        block = BLOCKS[arch.block]
        # Non-persistent: normalization travels in the checkpoint's "normalization" entry, not the state dict.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self.conv1, self.maxpool = _stem(spec.variant, spec.width)
        self.bn1 = nn.BatchNorm2d(spec.width)
        self.relu = nn.ReLU(inplace=True)
        self._cin = spec.width
        self.layer1 = self._make_layer(block, spec.width, arch.layers[0], 1)
        self.layer2 = self._make_layer(block, spec.width * 2, arch.layers[1], 2)
        self.layer3 = self._make_layer(block, spec.width * 4, arch.layers[2], 2)
        self.layer4 = self._make_layer(block, spec.width * 8, arch.layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(spec.width * 8 * block.expansion, spec.num_classes)
        self._init_weights(spec.zero_init_residual)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self._cin != out:
            downsample = nn.Sequential(_conv1x1(self._cin, out, stride), nn.BatchNorm2d(out))
        layers = [block(self._cin, planes, stride, downsample)]
        self._cin = out
        layers += [block(out, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's init: He (fan_out) convs, unit BN; optionally zero the last BN gamma per block,
        which makes each residual branch start as identity (Goyal et al. 2017, helps large-batch runs)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    @property
    def normalization(self) -> dict[str, list[float]]:
        """Per-channel ``{"mean": [...], "std": [...]}`` applied inside ``forward`` (checkpoint field)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [N, C] for inputs in [0, 1]."""
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W] in [0, 1]."""
        return self.fc(self.features(x))


def build_model(arch: str, variant: str = "imagenet", num_classes: int = 1000, width: int = 64,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                zero_init_residual: bool = False) -> ResNet:
    """Build a ResNet; ``mean``/``std`` default to ``default_normalization(variant)``."""
    return ResNet(ModelSpec(arch, variant, num_classes, width, None if mean is None else tuple(mean),
                            None if std is None else tuple(std), zero_init_residual))


def _arch_builder(arch: str) -> Callable[..., ResNet]:
    def build(variant: str = "imagenet", num_classes: int = 1000, **kwargs) -> ResNet:
        return build_model(arch, variant, num_classes, **kwargs)
    build.__name__ = arch
    build.__doc__ = f"``build_model({arch!r}, ...)``."
    return build


resnet18 = _arch_builder("resnet18")
resnet34 = _arch_builder("resnet34")
resnet50 = _arch_builder("resnet50")
resnet101 = _arch_builder("resnet101")
