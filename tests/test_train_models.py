"""rankshard.train.models: torchvision key/shape compatibility, forward shapes, parameter counts, normalization."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rankshard.preprocess.sources.synth import natural_batch
from rankshard.train.models import ARCHS, CIFAR10_MEAN, IMAGENET_MEAN, IMAGENET_STD, ModelSpec, ResNet, build_model, resnet18, resnet50

FIXTURES = Path(__file__).parent / "fixtures"
# Published torchvision parameter counts (torchvision.models docs, "Params" column).
PUBLISHED_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                    "resnet101": 44_549_160}


def _fixture(arch):
    return [(name, tuple(shape)) for name, shape in json.loads((FIXTURES / f"torchvision_{arch}_keys.json").read_text())]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("variant", ["imagenet", "cifar"])
def test_state_dict_matches_torchvision(arch, variant):
    expected = _fixture(arch)
    if variant == "cifar":  # only the stem conv differs: 3x3 instead of 7x7
        expected = [(n, (64, 3, 3, 3) if n == "conv1.weight" else s) for n, s in expected]
    got = [(n, tuple(t.shape)) for n, t in build_model(arch, variant).state_dict().items()]
    assert got == expected  # same names, same shapes, same order


def test_fixture_sizes_match_published_figures():
    assert len(_fixture("resnet50")) == 320
    assert len(_fixture("resnet18")) == 122
    for arch in ("resnet18", "resnet50"):
        learnable = [s for n, s in _fixture(arch) if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        assert sum(int(np.prod(s)) for s in learnable) == PUBLISHED_PARAMS[arch]


@pytest.mark.parametrize("arch", sorted(PUBLISHED_PARAMS))
def test_parameter_counts(arch):
    assert sum(p.numel() for p in build_model(arch).parameters()) == PUBLISHED_PARAMS[arch]


def test_normalization_buffers_are_not_in_state_dict():
    model = build_model("resnet18", "imagenet")
    assert "mean" not in model.state_dict() and "std" not in model.state_dict()
    assert model.normalization == {"mean": pytest.approx(list(IMAGENET_MEAN)),
                                   "std": pytest.approx([0.229, 0.224, 0.225])}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("variant,size", [("imagenet", 48), ("cifar", 32)])
def test_forward_shapes(arch, variant, size):
    model = build_model(arch, variant, num_classes=7, width=8).eval()
    x = torch.from_numpy(natural_batch(2, size=(size, size))).float()
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        feats = model.features(x)
    expansion = 4 if ARCHS[arch].block == "bottleneck" else 1
    assert feats.shape == (2, 8 * 8 * expansion)


def test_feature_width_and_spatial_reduction():
    """imagenet stem divides resolution by 4 before layer1, cifar by 1; layer4 adds 8x -> 32x vs 8x total."""
    x = torch.rand(1, 3, 64, 64)
    for variant, side in (("imagenet", 2), ("cifar", 8)):
        m = build_model("resnet50", variant, width=4).eval()
        with torch.no_grad():
            h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            h = m.layer4(m.layer3(m.layer2(m.layer1(h))))
        assert h.shape == (1, 4 * 8 * 4, side, side)


def test_normalization_is_applied_inside():
    """Model on x equals the same network fed (x - mean)/std with identity normalization."""
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    a = build_model("resnet18", "cifar", num_classes=5, width=4, mean=mean, std=std).eval()
    b = build_model("resnet18", "cifar", num_classes=5, width=4, mean=(0, 0, 0), std=(1, 1, 1)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.from_numpy(natural_batch(3)).float()
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(xn), rtol=1e-5, atol=1e-5)


def test_zero_init_residual():
    m = build_model("resnet50", width=4, zero_init_residual=True)
    assert all(float(blk.bn3.weight.detach().abs().sum()) == 0 for layer in (m.layer1, m.layer4) for blk in layer)
    m = resnet18(width=4, zero_init_residual=True)
    assert float(m.layer2[1].bn2.weight.detach().abs().sum()) == 0 and float(m.layer2[1].bn1.weight.detach().min()) == 1


def test_arch_shortcuts_and_spec_validation():
    assert isinstance(resnet50("cifar", 10, width=4), ResNet)
    assert resnet50("cifar", 10, width=4).spec.variant == "cifar"
    with pytest.raises(ValueError, match="unknown arch 'resnet51'"):
        build_model("resnet51")
    with pytest.raises(ValueError, match="unknown variant"):
        ModelSpec("resnet18", variant="mnist")
    with pytest.raises(ValueError, match="std > 0"):
        build_model("resnet18", std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="3 values"):
        build_model("resnet18", mean=(0.5,), std=(0.5,))
    assert ModelSpec("resnet18", "cifar").mean == CIFAR10_MEAN and ModelSpec("resnet18").std == IMAGENET_STD


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["resnet50", "resnet18"])
def test_logits_match_torchvision(arch):
    """Where torchvision imports (GPU machines): torchvision's weights give torchvision's logits (fp32)."""
    pytest.importorskip("torchvision")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from crosscheck_torchvision import TOLERANCE, max_logit_difference

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert max_logit_difference(arch, torch.device("cuda"), batch=4) <= TOLERANCE
