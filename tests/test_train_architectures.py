"""Architecture registry: Wide-ResNet / PreAct-ResNet (RobustBench keys), torchvision Wide-ResNet / ResNeXt,
detection of the architecture from a state dict, clear refusals, normalization presets and warnings."""
import warnings

import pytest
import torch

from rankshard.train.checkpoint import (CheckpointError, NormalizationGuessed, checkpoint_payload, infer_spec,
                                        load_checkpoint, model_from_checkpoint, save_checkpoint)
from rankshard.train.models import arch_names, architecture, build_model

# Published parameter counts: torchvision.models docs ("Params" column) for the ImageNet models; for the CIFAR
# models the figures of the papers / RobustBench model cards (WRN-28-10 36.5M, WRN-34-10 46.2M, PreActResNet-18
# 11.2M), which the exact counts below round to.
PUBLISHED = {
    "wide_resnet50_2": (68_883_240, 1000), "wide_resnet101_2": (126_886_696, 1000),
    "resnext50_32x4d": (25_028_904, 1000), "resnext101_32x8d": (88_791_336, 1000),
    "wrn-28-10": (36_479_194, 10), "wrn-34-10": (46_160_474, 10), "preact_resnet18": (11_172_170, 10),
}
ROUNDED = {"wrn-28-10": 36.5e6, "wrn-34-10": 46.2e6, "preact_resnet18": 11.2e6, "wide_resnet50_2": 68.9e6,
           "resnext50_32x4d": 25.0e6}


def _variant(arch):
    return "imagenet" if architecture(arch).__name__ == "ResNet" else "cifar"


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_parameter_counts_match_published_figures(arch):
    count, classes = PUBLISHED[arch]
    model = build_model(arch, _variant(arch), classes)
    n = sum(p.numel() for p in model.parameters())
    assert n == count
    if arch in ROUNDED:
        assert round(n / 1e5) == round(ROUNDED[arch] / 1e5)  # the paper/docs figure, to the digit shown


def test_wrn_keys_follow_robustbench():
    keys = list(build_model("wrn-28-10", "cifar", 10).state_dict())
    assert keys[:2] == ["conv1.weight", "block1.layer.0.bn1.weight"]
    assert "block1.layer.0.convShortcut.weight" in keys and "block1.layer.1.convShortcut.weight" not in keys
    assert {k.split(".")[2] for k in keys if k.startswith("block3.layer.")} == {str(i) for i in range(4)}
    assert keys[-7:] == ["bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked",
                         "fc.weight", "fc.bias"]


def test_preact_keys_follow_robustbench():
    keys = list(build_model("preact_resnet18", "cifar", 10).state_dict())
    assert "layer2.0.shortcut.0.weight" in keys and "layer1.0.shortcut.0.weight" not in keys
    assert "bn1.weight" not in keys and "bn.weight" in keys and keys[-2:] == ["linear.weight", "linear.bias"]
    assert "bn.weight" not in build_model("preact_resnet18_nobn", "cifar", 10).state_dict()


def test_torchvision_wide_and_resnext_shapes():
    wide = build_model("wide_resnet50_2").state_dict()
    assert tuple(wide["layer1.0.conv1.weight"].shape) == (128, 64, 1, 1)  # inner width doubled
    assert tuple(wide["layer1.0.conv3.weight"].shape) == (256, 128, 1, 1)
    rx = build_model("resnext50_32x4d").state_dict()
    assert tuple(rx["layer1.0.conv2.weight"].shape) == (128, 4, 3, 3)  # 32 groups of 4 channels


@pytest.mark.parametrize("arch,variant,width", [
    ("resnet50", "imagenet", 8), ("wide_resnet50_2", "imagenet", 8), ("wide_resnet101_2", "cifar", 8),
    ("resnext50_32x4d", "imagenet", 64), ("wrn-28-10", "cifar", 16), ("wrn-16-4", "cifar", 4),
    ("preact_resnet18", "cifar", 8), ("preact_resnet18_nobn", "cifar", 8)])
def test_architecture_detected_from_keys(arch, variant, width):
    sd = build_model(arch, variant, 10, width).state_dict()
    assert infer_spec(sd) == {"arch": arch, "variant": variant, "num_classes": 10, "width": width}


def _torchvision_file(tmp_path, arch, width):
    """A plain state dict as torchvision saves it (no normalization, no rankshard fields)."""
    torch.manual_seed(0)
    model = build_model(arch, "imagenet", 10, width).eval()
    torch.save(model.state_dict(), tmp_path / f"{arch}.pth")
    return model, tmp_path / f"{arch}.pth"


def test_wide_resnet50_2_state_dict_loads_and_evaluates(tmp_path):
    # The bug: a wide_resnet50_2 state dict was read as resnet50 and crashed in load_state_dict.
    ref, path = _torchvision_file(tmp_path, "wide_resnet50_2", 16)
    with pytest.warns(NormalizationGuessed, match="'imagenet'"):
        model, payload = model_from_checkpoint(path)
    assert payload["arch"] == "wide_resnet50_2" and payload["config"]["source"]["normalization_guess"] == "imagenet"
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_bogus_state_dict_refused_with_what_was_found(tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.weight": torch.zeros(10, 8)},
               tmp_path / "vgg.pth")
    with pytest.raises(CheckpointError, match=r"no architecture rankshard knows.*features.*classifier"):
        load_checkpoint(tmp_path / "vgg.pth")


def test_unregistered_resnet_shape_refused(tmp_path):
    sd = build_model("resnext50_32x4d", "imagenet", 10).state_dict()
    sd["layer1.0.conv2.weight"] = torch.zeros(128, 8, 3, 3)  # 16 groups of 8: no such registered model
    with pytest.raises(CheckpointError, match=r"groups 16.*match no registered architecture"):
        infer_spec(sd, "x.pth")


def test_shape_mismatch_is_a_checkpoint_error_not_a_traceback():
    sd = build_model("wrn-16-4", "cifar", 10, 4).state_dict()
    sd["block2.layer.0.conv2.weight"] = torch.zeros(1, 1, 3, 3)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        model_from_checkpoint(sd, normalization="none")


def test_robustbench_wrn_loads_with_none_guess_and_preset_override(tmp_path):
    sd = {f"module.{k}": v for k, v in build_model("wrn-16-4", "cifar", 10, 4).state_dict().items()}
    sd["module.sub_block1.layer.0.conv1.weight"] = torch.zeros(1)  # TRADES leftovers are dropped
    torch.save(sd, tmp_path / "wrn.pt")
    with pytest.warns(NormalizationGuessed, match="'none'"):
        model, _ = model_from_checkpoint(tmp_path / "wrn.pt")
    assert model.normalization == {"mean": [0.0] * 3, "std": [1.0] * 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given explicitly: no warning
        model, payload = model_from_checkpoint(tmp_path / "wrn.pt", normalization="cifar10")
    assert payload["config"]["source"]["normalization_given"] and model.normalization["std"][0] == pytest.approx(0.2470, abs=1e-3)
    with pytest.raises(CheckpointError, match="not a preset"):
        model_from_checkpoint(tmp_path / "wrn.pt", normalization="svhn")


@pytest.mark.parametrize("arch", ["wrn-16-4", "preact_resnet18"])
def test_our_checkpoints_record_normalization(tmp_path, arch):
    model = build_model(arch, "cifar", 10, 4, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    save_checkpoint(tmp_path / "c.pt", checkpoint_payload(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rebuilt, payload = model_from_checkpoint(tmp_path / "c.pt")
    assert payload["normalization"] == model.normalization and payload["arch"] == arch
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))


def test_registry_lists_named_architectures_and_refuses_unknown():
    assert {"wrn-28-10", "preact_resnet18", "wide_resnet50_2", "resnext50_32x4d"} <= set(arch_names())
    with pytest.raises(ValueError, match="wrn-<depth>-<widen>"):
        build_model("wrn-27-10", "cifar")
    with pytest.raises(ValueError, match="only with variant='cifar'"):
        build_model("wrn-28-10", "imagenet")
