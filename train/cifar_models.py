"""CIFAR architectures of the adversarial-robustness literature, with RobustBench's state-dict key names.

* ``wrn-<depth>-<widen>`` (e.g. ``wrn-28-10``, ``wrn-34-10``, ``wrn-70-16``): the pre-activation Wide-ResNet of
  Zagoruyko & Komodakis (2016) as TRADES / RobustBench write it (``robustbench/model_zoo/architectures/
  wide_resnet.py``): keys ``conv1``, ``block{1,2,3}.layer.<i>.{bn1,conv1,bn2,conv2,convShortcut}``, ``bn1``,
  ``fc``. Channels per group ``[w, w*k, 2*w*k, 4*w*k]`` with ``w`` = 16 (``ModelSpec.width``).
* ``preact_resnet18``: the PreAct-ResNet-18 of He et al. (2016, "Identity mappings") used by Wong et al. 2020
  and Rice et al. 2020: keys ``conv1``, ``layer<n>.<i>.{bn1,conv1,bn2,conv2,shortcut.0}``, ``bn`` (the BN +
  ReLU before the classifier), ``linear``. ``preact_resnet18_nobn`` is RobustBench's ``PreActResNet18()``
  without that final BN. The shortcut convolves the pre-activated input (kuangliu / Wong et al.).

Like every model here they take [0, 1] inputs and normalize inside (``models.NormalizedNet``); RobustBench's
own classes do not normalize, so their checkpoints load with normalization ``none`` (see ``checkpoint``).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from rankshard.train.models import ModelSpec, NormalizedNet


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice. When the channel count changes, the shortcut is a 1x1 conv of the *activated*
    input, as TRADES/RobustBench do (so the first BN-ReLU is shared by both paths)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = cin == cout
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(act))))
        return out + (x if self.equal_in_out else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A group of ``n`` wide blocks under ``.layer`` (the extra level is part of RobustBench's key names)."""

    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                     for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


_WRN_NAME = re.compile(r"wrn-(\d+)-(\d+)$")


def wrn_depth_widen(arch: str) -> tuple[int, int]:
    """``"wrn-28-10"`` -> (28, 10); depth must be 6n + 4 (three groups of n two-conv blocks + stem + fc)."""
    match = _WRN_NAME.match(arch)
    if not match or (int(match.group(1)) - 4) % 6 or int(match.group(1)) < 10:
        raise ValueError(f"{arch!r} is not a Wide-ResNet name wrn-<depth>-<widen> with depth = 6n + 4 >= 10")
    return int(match.group(1)), int(match.group(2))


class WideResNet(NormalizedNet):
    """WRN-depth-widen for 32x32 inputs; ``state_dict()`` keys equal RobustBench's ``WideResNet``."""

    DEFAULT_WIDTH = 16

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        depth, widen = wrn_depth_widen(spec.arch)
        n, w = (depth - 4) // 6, spec.width
        channels = [w, w * widen, 2 * w * widen, 4 * w * widen]
        self.conv1 = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], spec.num_classes)
        _init_like_robustbench(self)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features [N, C] for inputs in [0, 1]."""
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        # adaptive pooling equals RobustBench's avg_pool2d(out, 8) on 32x32 inputs, and works on others too
        return torch.flatten(F.adaptive_avg_pool2d(self.relu(self.bn1(out)), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _init_like_robustbench(model: nn.Module) -> None:
    """He-normal convs (fan_out), unit BN, zero classifier bias: TRADES/RobustBench's init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice; a 1x1 conv shortcut (no BN) of the activated input when the shape changes."""

    def __init__(self, cin: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + shortcut


class PreActResNet18(NormalizedNet):
    """PreAct-ResNet-18 for 32x32 inputs; keys as RobustBench/Wong et al. (``bn`` only with the final BN)."""

    DEFAULT_WIDTH = 64
    LAYERS = (2, 2, 2, 2)

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        w = spec.width
        self.conv1 = nn.Conv2d(3, w, 3, stride=1, padding=1, bias=False)
        cin, stages = w, []
        for i, blocks in enumerate(self.LAYERS):
            planes, stride = w * 2 ** i, 1 if i == 0 else 2
            stages.append(nn.Sequential(*[PreActBlock(cin if j == 0 else planes, planes, stride if j == 0 else 1)
                                          for j in range(blocks)]))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.final_bn = not spec.arch.endswith("_nobn")
        if self.final_bn:
            self.bn = nn.BatchNorm2d(cin)
        self.linear = nn.Linear(cin, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.final_bn:
            out = F.relu(self.bn(out))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


# Named for listings; any valid wrn-<depth>-<widen> resolves too (``cifar_architecture``).
CIFAR_ARCHS: dict[str, type[NormalizedNet]] = {
    "wrn-28-10": WideResNet, "wrn-34-10": WideResNet, "wrn-34-20": WideResNet, "wrn-70-16": WideResNet,
    "preact_resnet18": PreActResNet18, "preact_resnet18_nobn": PreActResNet18}


def cifar_architecture(arch: str) -> type[NormalizedNet] | None:
    if arch in CIFAR_ARCHS:
        return CIFAR_ARCHS[arch]
    try:
        wrn_depth_widen(arch)
    except ValueError:
        return None
    return WideResNet
