"""The architecture registry (``architecture``/``build_model``) and the torchvision ResNet family.

ResNets written in the project, with torchvision's exact state-dict key names and shapes (ResNet-18..101,
Wide-ResNet-50-2/101-2 and ResNeXt-50 32x4d/101 32x8d: the same keys, wider or grouped bottlenecks); the
CIFAR Wide-ResNets and PreAct-ResNet-18 of the robustness literature are in ``cifar_models``.

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
# Named input normalizations (mean, std per RGB channel) for ``--normalization``; "none" feeds the network the
# [0, 1] pixels as they are (RobustBench's CIFAR models normalize nothing).
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}
INPUT_SIZE = {"imagenet": 224, "cifar": 32}  # pixels (square side) each stem was designed for


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34); ``downsample`` is a 1x1 conv + BN when the shape changes."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        if groups != 1 or base_width != 64:  # as torchvision: wide/grouped variants are bottleneck-only
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
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
    """1x1 reduce, 3x3 (carries the stride: torchvision v1.5), 1x1 expand by 4 (ResNet-50/101).

    ``groups``/``base_width`` as torchvision: the inner width is ``planes * base_width / 64 * groups``, so
    Wide-ResNet-50-2 (base_width 128) doubles it and ResNeXt-50 32x4d groups the 3x3 conv 32 ways."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
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
    """A torchvision ResNet: block type (key of ``BLOCKS``), blocks per stage, and the bottleneck's 3x3 conv
    groups and width per group (64 and 1 for plain ResNets; see ``Bottleneck``)."""

    block: str
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64


ARCHS: dict[str, ArchSpec] = {
    "resnet18": ArchSpec("basic", (2, 2, 2, 2)),
    "resnet34": ArchSpec("basic", (3, 4, 6, 3)),
    "resnet50": ArchSpec("bottleneck", (3, 4, 6, 3)),
    "resnet101": ArchSpec("bottleneck", (3, 4, 23, 3)),
    "wide_resnet50_2": ArchSpec("bottleneck", (3, 4, 6, 3), width_per_group=128),
    "wide_resnet101_2": ArchSpec("bottleneck", (3, 4, 23, 3), width_per_group=128),
    "resnext50_32x4d": ArchSpec("bottleneck", (3, 4, 6, 3), groups=32, width_per_group=4),
    "resnext101_32x8d": ArchSpec("bottleneck", (3, 4, 23, 3), groups=32, width_per_group=8),
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
        if architecture(self.arch) is None:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {arch_names()}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose one of {list(VARIANTS)}")
        if self.arch not in ARCHS and self.variant != "cifar":  # WRN/PreAct have only the 32x32 stem
            raise ValueError(f"arch {self.arch!r} exists only with variant='cifar', got {self.variant!r}")
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


class NormalizedNet(nn.Module):
    """Base of every architecture here: keeps its ``ModelSpec`` and normalizes [0, 1] inputs inside."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        # Non-persistent: normalization travels in the checkpoint's "normalization" entry, not the state dict.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    @property
    def normalization(self) -> dict[str, list[float]]:
        """Per-channel ``{"mean": [...], "std": [...]}`` applied inside ``forward`` (checkpoint field)."""
        return {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ResNet(NormalizedNet):
    """ResNet on [0, 1] inputs; ``state_dict()`` keys and shapes equal torchvision's for the same arch."""

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        arch = ARCHS[spec.arch]
        block = BLOCKS[arch.block]
        self._block_kwargs = {"groups": arch.groups, "base_width": arch.width_per_group}
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
        layers = [block(self._cin, planes, stride, downsample, **self._block_kwargs)]
        self._cin = out
        layers += [block(out, planes, **self._block_kwargs) for _ in range(1, blocks)]
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [N, C] for inputs in [0, 1]."""
        x = self.normalize(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] for images [N, 3, H, W] in [0, 1]."""
        return self.fc(self.features(x))


def architecture(arch: str) -> Callable[[ModelSpec], NormalizedNet] | None:
    """The registry: the constructor (taking a ``ModelSpec``) of a buildable arch name, else None.

    torchvision ResNets/Wide-ResNets/ResNeXts live here; the CIFAR Wide-ResNets (any ``wrn-<depth>-<widen>``)
    and PreAct-ResNets, with RobustBench key layouts, in ``rankshard.train.cifar_models``, imported late
    because they subclass ``NormalizedNet``."""
    from rankshard.train.cifar_models import cifar_architecture

    return ResNet if arch in ARCHS else cifar_architecture(arch)


def arch_names() -> list[str]:
    """The named architectures (Wide-ResNets of other depths/widths resolve too)."""
    from rankshard.train.cifar_models import CIFAR_ARCHS

    return [*ARCHS, *CIFAR_ARCHS]


def build_model(arch: str, variant: str = "imagenet", num_classes: int = 1000, width: int | None = None,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                zero_init_residual: bool = False) -> NormalizedNet:
    """Build a registered architecture; ``mean``/``std`` default to ``default_normalization(variant)``,
    ``width`` (the stem conv's output channels) to the architecture's own (64; 16 for Wide-ResNets)."""
    constructor = architecture(arch)
    if constructor is None:
        raise ValueError(f"unknown arch {arch!r}; choose one of {arch_names()} or wrn-<depth>-<widen>")
    width = getattr(constructor, "DEFAULT_WIDTH", 64) if width is None else width
    return constructor(ModelSpec(arch, variant, num_classes, width, None if mean is None else tuple(mean),
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
wide_resnet50_2 = _arch_builder("wide_resnet50_2")
wide_resnet101_2 = _arch_builder("wide_resnet101_2")
resnext50_32x4d = _arch_builder("resnext50_32x4d")
resnext101_32x8d = _arch_builder("resnext101_32x8d")
