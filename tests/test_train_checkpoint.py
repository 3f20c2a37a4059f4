"""rankshard.train.checkpoint: format round trip, atomic writes, foreign formats, refusal of unsafe pickles."""
import argparse
import copy
import functools
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

import rankshard.train.checkpoint as ckpt
from rankshard.preprocess.sources.synth import natural_batch
from rankshard.train.checkpoint import (FORMAT, CheckpointError, checkpoint_payload, infer_spec, load_checkpoint,
                              model_from_checkpoint, normalize_checkpoint, save_checkpoint)
from rankshard.train.models import IMAGENET_MEAN, IMAGENET_STD, build_model


def _tiny(arch="resnet18", variant="cifar", num_classes=7, width=4, mean=None, std=None):
    return copy.deepcopy(_tiny_cached(arch, variant, num_classes, width, mean, std))


@functools.lru_cache(maxsize=None)
def _tiny_cached(arch, variant, num_classes, width, mean, std):
    torch.manual_seed(0)
    model = build_model(arch, variant, num_classes, width, mean, std)
    # Non-trivial BN statistics, so a wrong buffer mapping would show in the outputs.
    with torch.no_grad():
        model.train()(torch.from_numpy(natural_batch(8, size=(32, 32), seed=1)).float())
    return model.eval()


def _logits(model, size=32):
    with torch.no_grad():
        return model(torch.from_numpy(natural_batch(4, size=(size, size), seed=2)).float())


def _trained_state(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    x = torch.from_numpy(natural_batch(4, seed=3)).float()
    model.train()(x).logsumexp(1).mean().backward()
    opt.step()
    sched.step()
    return opt, sched


def test_round_trip_is_weights_only_readable(tmp_path):
    model = _tiny()
    opt, sched = _trained_state(model)
    model.eval()
    gen = torch.Generator().manual_seed(5)
    payload = checkpoint_payload(
        model, optimizer=opt.state_dict(), scheduler=sched.state_dict(), epoch=3, step=120,
        rng={"torch": torch.get_rng_state(), "loader": gen.get_state()},
        config={"lr": 0.1, "milestones": [30, 60], "amp": False, "note": None},
        data={"variant": "rank-016", "manifest_sha256": "ab" * 32, "classes": [f"c{i}" for i in range(7)]},
        metrics={"top1": [0.1, 0.25]})
    path = save_checkpoint(tmp_path / "sub" / "last.pt", payload)
    raw = torch.load(path, weights_only=True)  # the contract: plain weights_only load works
    assert raw["format"] == FORMAT and raw["epoch"] == 3 and raw["config"]["milestones"] == [30, 60]
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["optimizer"]["state"][0]["momentum_buffer"],
                               opt.state_dict()["state"][0]["momentum_buffer"])
    assert loaded["scheduler"]["last_epoch"] == 1
    assert torch.equal(loaded["rng"]["loader"], gen.get_state())
    rebuilt, _ = model_from_checkpoint(path)
    assert not rebuilt.training
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=0, atol=0)


def test_documented_safe_leaves_survive_weights_only(tmp_path):
    obj = {"size": torch.Size([2, 3]), "dtype": torch.float16, "device": torch.device("cpu"), "c": 1 + 2j,
           "b": b"\x00\x01", "t": (1, 2.5, "x"), "od": OrderedDict(a=1), "p": torch.nn.Parameter(torch.ones(2)),
           2: None, True: 3.0}
    ckpt.check_weights_only_safe(obj)
    torch.save(obj, tmp_path / "leaves.pt")
    back = torch.load(tmp_path / "leaves.pt", weights_only=True)
    assert back["size"] == obj["size"] and back["dtype"] == torch.float16 and back["t"] == (1, 2.5, "x")


@pytest.mark.parametrize("bad,where", [
    ({"metrics": {"acc": np.float64(0.5)}}, r"x.pt\['metrics'\]\['acc'\]: numpy\..*float64"),
    ({"rng": {"numpy": np.random.default_rng(0).bit_generator.state["state"]["state"] * np.ones(2)}},
     r"\['rng'\]\['numpy'\]: numpy.ndarray"),
    ({"config": {"fn": len}}, r"\['config'\]\['fn'\]"),
    ({"config": {(1, 2): "tuple key"}}, r"dict key \(1, 2\)"),
])
def test_unsafe_payload_is_rejected_before_writing(tmp_path, bad, where):
    payload = {**checkpoint_payload(_tiny()), **bad}
    with pytest.raises(CheckpointError, match=where):
        save_checkpoint(tmp_path / "x.pt", payload)
    assert list(tmp_path.iterdir()) == []


def test_payload_validation_errors(tmp_path):
    payload = checkpoint_payload(_tiny())
    with pytest.raises(CheckpointError, match=r"unknown keys \['scaler'\]"):
        save_checkpoint(tmp_path / "x.pt", {**payload, "scaler": {}})
    with pytest.raises(CheckpointError, match=r"declares num_classes=10 but its state_dict holds num_classes=7"):
        save_checkpoint(tmp_path / "x.pt", {**payload, "num_classes": 10})
    with pytest.raises(CheckpointError, match="declares variant='imagenet'"):
        save_checkpoint(tmp_path / "x.pt", {**payload, "variant": "imagenet"})
    with pytest.raises(CheckpointError, match=r"lists 10 names but num_classes=7"):
        save_checkpoint(tmp_path / "x.pt", {**payload, "data": {"classes": list("abcdefghij")}})
    with pytest.raises(CheckpointError, match="is not 'rankshard-checkpoint/1'"):
        normalize_checkpoint({**payload, "format": "rankshard-checkpoint/2"})
    with pytest.raises(CheckpointError, match="unknown fields"):
        checkpoint_payload(_tiny(), epochs=3)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = _tiny()
    path = save_checkpoint(tmp_path / "last.pt", checkpoint_payload(model, epoch=1))
    before = path.read_bytes()

    def torn_save(obj, f):  # writes part of a file, then dies (disk full, killed, ...)
        f.write(b"PK\x03\x04 partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, checkpoint_payload(model, epoch=2))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "new.pt", checkpoint_payload(model, epoch=2))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file, no torn new.pt
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1


def test_missing_empty_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty file"):
        load_checkpoint(tmp_path / "empty.pt")
    full = save_checkpoint(tmp_path / "full.pt", checkpoint_payload(_tiny())).read_bytes()
    for cut in (len(full) // 2, 100):
        (tmp_path / "cut.pt").write_bytes(full[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(tmp_path / "cut.pt")


class SideEffect:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = {**checkpoint_payload(_tiny()), "config": {"x": SideEffect(marker)}}
    torch.save(payload, tmp_path / "evil.pt")  # pickling does not run it
    with pytest.raises(CheckpointError, match=r"needs the global (posix|nt)\.system.*--trust-checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()


def _madry_state(model, mean, std):
    """A MadryLab ``robustness`` AttackerModel state dict built from our model (CIFAR names, DataParallel)."""
    sd = {}
    for key, value in model.state_dict().items():
        key = key.replace("downsample", "shortcut")
        key = "linear" + key[2:] if key.startswith("fc.") else key
        sd[f"module.model.{key}"] = value.clone()
        sd[f"module.attacker.model.{key}"] = value.clone()
    for prefix in ("module.normalizer", "module.attacker.normalize"):
        sd[f"{prefix}.new_mean"] = torch.tensor(mean).view(3, 1, 1)
        sd[f"{prefix}.new_std"] = torch.tensor(std).view(3, 1, 1)
    return sd


def test_madrylab_cifar_checkpoint(tmp_path):
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    model = _tiny("resnet50", "cifar", num_classes=10, width=4, mean=mean, std=std)
    opt, _ = _trained_state(model)
    model.eval()
    torch.save({"model": _madry_state(model, mean, std), "optimizer": opt.state_dict(), "schedule": None,
                "epoch": 151}, tmp_path / "cifar_linf_8.pt")
    payload = load_checkpoint(tmp_path / "cifar_linf_8.pt")
    assert (payload["arch"], payload["variant"], payload["num_classes"], payload["epoch"]) == ("resnet50", "cifar", 10, 151)
    assert payload["normalization"]["mean"] == pytest.approx(mean)
    assert payload["config"]["source"]["format"] == "madrylab-robustness"
    rebuilt, _ = model_from_checkpoint(tmp_path / "cifar_linf_8.pt")
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=0, atol=0)


def test_madrylab_with_custom_object_needs_trust(tmp_path):
    model = _tiny("resnet18", "imagenet", num_classes=5, width=4)
    sd = _madry_state(model, IMAGENET_MEAN, IMAGENET_STD)
    sd = {k.replace("shortcut", "downsample").replace("linear", "fc"): v for k, v in sd.items()}  # ImageNet names
    path = tmp_path / "imagenet_l2_3_0.pt"
    torch.save({"model": sd, "epoch": 90, "args": argparse.Namespace(arch="resnet18", eps=3.0)}, path)
    with pytest.raises(CheckpointError, match=r"needs the global argparse\.Namespace.*only for files you trust"):
        load_checkpoint(path)
    payload = load_checkpoint(path, trust=True)
    assert (payload["arch"], payload["variant"], payload["epoch"]) == ("resnet18", "imagenet", 90)
    rebuilt, _ = model_from_checkpoint(path, trust=True)
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("arch,wrap", [
    ("resnet50", lambda sd: sd),
    ("resnet18", lambda sd: {f"module.{k}": v for k, v in sd.items()}),
    ("resnet18", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}),
])
def test_torchvision_state_dicts(tmp_path, arch, wrap):
    model = _tiny(arch, "imagenet", num_classes=6, width=4)
    torch.save(wrap(model.state_dict()), tmp_path / "tv.pt")
    rebuilt, payload = model_from_checkpoint(tmp_path / "tv.pt")
    assert (payload["arch"], payload["variant"], payload["num_classes"]) == (arch, "imagenet", 6)
    assert payload["normalization"] == {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert payload["config"]["source"]["normalization_assumed"] is True
    torch.testing.assert_close(_logits(rebuilt), _logits(model), rtol=0, atol=0)


def test_full_size_torchvision_layouts_are_recognised():
    for arch, classes in (("resnet50", 1000), ("resnet18", 1000)):
        sd = build_model(arch).state_dict()
        assert infer_spec(sd) == {"arch": arch, "variant": "imagenet", "num_classes": classes, "width": 64}


def test_model_from_checkpoint_overrides_and_mismatches(tmp_path):
    payload = checkpoint_payload(_tiny(num_classes=7))
    with pytest.raises(CheckpointError, match="declares num_classes=10 but its state_dict holds num_classes=7"):
        model_from_checkpoint(payload, num_classes=10)
    model, out = model_from_checkpoint(payload, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert model.normalization == {"mean": [0.5] * 3, "std": [0.25] * 3} and out["normalization"]["mean"] == [0.5] * 3
    with pytest.raises(CheckpointError, match=r"unknown overrides \['widht'\]"):
        model_from_checkpoint(payload, widht=8)
    with pytest.raises(CheckpointError, match="no 'conv1.weight'"):
        normalize_checkpoint({"encoder.weight": torch.zeros(2)}, "vit.pt")
    with pytest.raises(CheckpointError, match="no state dict of tensors"):
        normalize_checkpoint({"epoch": 3}, "odd.pt")


def _ours(**changes):
    payload = checkpoint_payload(_tiny())
    for key, value in changes.items():
        payload[key] = value
    return payload


def _with_weight(key, value):
    payload = checkpoint_payload(_tiny())
    payload["state_dict"][key] = value
    return payload


def _madry(**extra):
    state = {f"module.model.{k}": v for k, v in _tiny().state_dict().items()}
    return {"model": {**state, **extra}, "epoch": 3}


MALFORMED = {  # files torch.load(weights_only=True) reads without complaint, but that describe no model
    "state_dict a list": (lambda: _ours(state_dict=[1, 2]), "state_dict"),
    "weight a string": (lambda: _with_weight("fc.bias", "x"), "fc.bias"),
    "weight a list": (lambda: _with_weight("conv1.weight", [1.0]), "conv1.weight"),
    "int weight name": (lambda: _with_weight(5, torch.zeros(1)), "state_dict"),
    "conv1 not 4-d": (lambda: {**_tiny().state_dict(), "conv1.weight": torch.tensor(1.0)}, "conv1.weight"),
    "one mean value": (lambda: _ours(normalization={"mean": [0.5], "std": [0.2]}), "normalization"),
    "mean a string": (lambda: _ours(normalization={"mean": "abc", "std": [0.2] * 3}), "normalization"),
    "std zero": (lambda: _ours(normalization={"mean": [0.5] * 3, "std": [0.0] * 3}), "normalization"),
    "num_classes text": (lambda: _ours(num_classes="7"), "num_classes"),
    "input_size text": (lambda: _ours(input_size="big"), "input_size"),
    "data a list": (lambda: _ours(data=["x"]), "data"),
    "config a string": (lambda: _ours(config="x"), "config"),
    "madry mean without std": (lambda: _madry(**{"module.normalizer.new_mean": torch.zeros(3, 1, 1)}), "new_std"),
    "int keys foreign": (lambda: {**_tiny().state_dict(), 5: torch.zeros(1)}, "state dict"),
    "resnet without stem bn": (lambda: {k: v for k, v in _tiny().state_dict().items() if not k.startswith("bn1.")},
                               "without the stem's 'bn1.*'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_are_refused_naming_file_and_field(tmp_path, case):
    """Hostile or hand-edited files load as pickles; each must be a CheckpointError (the CLIs print it, exit
    2) naming the file and the field, never an AttributeError/KeyError/ValueError traceback."""
    make, field = MALFORMED[case]
    path = tmp_path / "odd.pt"
    torch.save(make(), path)
    with pytest.raises(CheckpointError) as err:
        model_from_checkpoint(path)
    assert str(path) in str(err.value) and field in str(err.value)


def test_resume_candidates_offer_the_newest_state_first(tmp_path):
    """epoch-0004.pt written with the last last.pt is newer than last.prev.pt (the last.pt before it)."""
    import os

    from rankshard.train.rundir import resume_candidates

    for age, name in ((300, "epoch-0003.pt"), (200, "last.prev.pt"), (100, "epoch-0004.pt")):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1e9 - age, 1e9 - age))
    (tmp_path / "last.pt").write_bytes(b"x")  # not a stand-in for itself
    assert resume_candidates(tmp_path) == ["epoch-0004.pt", "last.prev.pt", "epoch-0003.pt"]
    for name in ("epoch-0003.pt", "last.prev.pt", "epoch-0004.pt", "epoch-0010.pt"):  # copied without times
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (1e9, 1e9))
    assert resume_candidates(tmp_path) == ["epoch-0010.pt", "epoch-0004.pt", "epoch-0003.pt", "last.prev.pt"]
