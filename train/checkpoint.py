"""Checkpoints: the ``rankshard-checkpoint/1`` format (SPEC.md "Checkpoints"), safe loading, foreign formats.

A checkpoint is ``torch.save`` of a dict holding only tensors, numbers, strings, lists and dicts, so that
``torch.load(weights_only=True)`` reads it without running any code from the file. Pickles can execute
arbitrary code on load, and checkpoints are routinely downloaded, so full unpickling is opt-in
(``trust=True``, the CLIs' ``--trust-checkpoint``) and the refusal names the global the file wanted.

Foreign files are normalized into the same dict on load, with the model description inferred from the
state dict itself (block type, blocks per stage, stem kernel, width, classifier rows):

* plain torchvision ResNet state dicts (``conv1.weight`` ... ``fc.bias``), optionally with DDP
  ``module.`` prefixes or wrapped as ``{"state_dict": ...}`` / ``{"model": ...}``;
* MadryLab ``robustness`` checkpoints: ``{"model": {"module.model.*", "module.normalizer.new_mean",
  "module.attacker.*", ...}, "epoch": ...}``; their CIFAR ResNets name ``shortcut``/``linear`` what
  torchvision calls ``downsample``/``fc``, and their normalizer buffers ([C, 1, 1]) give mean/std.
"""
from __future__ import annotations

import math
import os
import shutil
import pickle
import re
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from rankshard.preprocess.errors import RankshardError
from rankshard.train.cifar_models import PreActResNet18
from rankshard.train.models import ARCHS, INPUT_SIZE, NORMALIZATION_PRESETS, ArchSpec, NormalizedNet, build_model

FORMAT = "rankshard-checkpoint/1"
REQUIRED_KEYS = ("format", "arch", "variant", "num_classes", "normalization", "state_dict")
OPTIONAL_KEYS = ("input_size", "optimizer", "scheduler", "epoch", "step", "rng", "config", "data", "metrics")
TRUST_HINT = ("rerun with --trust-checkpoint (trust=True) to allow full unpickling, "
              "but only for files you trust: unpickling can run arbitrary code")

# Leaf types torch.load(weights_only=True) rebuilds without custom code (checked by round-trip tests).
_SAFE_LEAVES = (bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device)
_SAFE_TENSORS = (torch.Tensor, nn.Parameter)


class CheckpointError(RankshardError):
    """A checkpoint cannot be written, read or understood; the message names the file and the fix."""


def check_weights_only_safe(obj: Any, where: str = "payload") -> None:
    """Raise ``CheckpointError`` naming the first entry ``torch.load(weights_only=True)`` could not rebuild."""
    # Exact types: numpy.float64 subclasses float yet needs a numpy global to unpickle.
    if type(obj) in _SAFE_TENSORS or type(obj) in _SAFE_LEAVES:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where}: dict key {key!r} of type {type(key).__name__} is not "
                                      "weights_only-safe; use str or int keys")
            check_weights_only_safe(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_weights_only_safe(value, f"{where}[{i}]")
        return
    raise CheckpointError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} is not weights_only-safe; store tensors, "
        "numbers, strings, lists or dicts (numpy arrays as torch.from_numpy(a) or a.tolist(), numpy scalars "
        "as float(x)/int(x), dataclasses as dataclasses.asdict(c))")


# ---------------------------------------------------------------------------------------------------------
# Inferring the model from a state dict


def infer_spec(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """``{"arch", "variant", "num_classes", "width"}`` read off the state dict's key names and shapes.

    The layout decides the family (RobustBench Wide-ResNet: ``block1.layer.*``; PreAct-ResNet: no top-level
    ``bn1`` but ``layer1.0.bn1``; else torchvision ResNet), shapes decide the member: blocks per stage, the
    bottleneck's inner width and 3x3 groups (Wide-ResNet-50-2 vs ResNet-50 vs ResNeXt-50 share key names).
    Anything else is refused with what was found, not guessed."""
    if "conv1.weight" not in state_dict:
        raise CheckpointError(f"{source}: no 'conv1.weight', so no architecture rankshard knows ({_found(state_dict)})")
    try:
        if "block1.layer.0.conv1.weight" in state_dict:
            return _infer_wrn(state_dict, source)
        if "bn1.weight" not in state_dict and "layer1.0.bn1.weight" in state_dict:
            if "fc.weight" in state_dict:  # a ResNet's classifier name (PreAct's is linear): its stem BN is gone
                raise CheckpointError(f"{source}: a ResNet layout (fc.weight) without the stem's 'bn1.*' weights: "
                                      f"the file is damaged or saved from a modified model; {_found(state_dict)}")
            return _infer_preact(state_dict, source)
        return _infer_resnet(state_dict, source)
    except (IndexError, ValueError) as exc:  # a weight of the wrong rank (conv1.weight 0-d, say): damaged
        raise CheckpointError(f"{source}: a weight has a shape no such layer has ({exc}); {_found(state_dict)}; "
                              "the file is damaged or not a model checkpoint") from None


def _found(state_dict: Mapping[str, Any]) -> str:
    """What a state dict holds, for refusals: its top-level modules and first keys with shapes."""
    tops = list(dict.fromkeys(k.split(".")[0] for k in state_dict))
    first = ", ".join(f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in list(state_dict.items())[:4])
    return f"found top-level modules {tops[:12]}; first keys: {first}"


def _blocks(state_dict: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct block indices under ``prefix`` (``layer2.`` -> 4 for ResNet-50)."""
    depth = prefix.count(".")
    return len({k.split(".")[depth] for k in state_dict if k.startswith(prefix)})


def _classifier(state_dict: Mapping[str, Any], key: str, source: str) -> int:
    if key not in state_dict:
        raise CheckpointError(f"{source}: no {key!r} classifier ({_found(state_dict)})")
    return int(state_dict[key].shape[0])


def _infer_wrn(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    n = [_blocks(state_dict, f"block{g}.layer.") for g in (1, 2, 3)]
    stem = int(state_dict["conv1.weight"].shape[0])
    widen, rest = divmod(int(state_dict["block1.layer.0.conv1.weight"].shape[0]), stem)
    if len(set(n)) != 1 or rest or state_dict["conv1.weight"].shape[-1] != 3:
        raise CheckpointError(f"{source}: a RobustBench-layout Wide-ResNet needs three equal groups and a 3x3 stem; "
                              f"found blocks per group {n}, stem {tuple(state_dict['conv1.weight'].shape)}, "
                              f"block1 conv1 {tuple(state_dict['block1.layer.0.conv1.weight'].shape)}")
    return {"arch": f"wrn-{6 * n[0] + 4}-{widen}", "variant": "cifar",
            "num_classes": _classifier(state_dict, "fc.weight", source), "width": stem}


def _infer_preact(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    layers = tuple(_blocks(state_dict, f"layer{i}.") for i in range(1, 5))
    if layers != PreActResNet18.LAYERS or state_dict["conv1.weight"].shape[-1] != 3:
        raise CheckpointError(f"{source}: pre-activation ResNet layout (no top-level bn1) with blocks per stage "
                              f"{layers} and stem {tuple(state_dict['conv1.weight'].shape)}; only PreAct-ResNet-18 "
                              f"(2, 2, 2, 2) with a 3x3 stem is registered")
    return {"arch": "preact_resnet18" if "bn.weight" in state_dict else "preact_resnet18_nobn", "variant": "cifar",
            "num_classes": _classifier(state_dict, "linear.weight", source),
            "width": int(state_dict["conv1.weight"].shape[0])}


def _resnet_arch(state_dict: Mapping[str, torch.Tensor]) -> ArchSpec:
    """Block type, blocks per stage, and (bottlenecks) the 3x3 groups and width per group, from layer1.0."""
    layers = tuple(_blocks(state_dict, f"layer{i}.") for i in range(1, 5))
    if "layer1.0.conv3.weight" not in state_dict:
        return ArchSpec("basic", layers)
    planes = int(state_dict["conv1.weight"].shape[0])  # layer1's planes equal the stem width
    inner, per_group = state_dict["layer1.0.conv2.weight"].shape[:2]
    groups = int(inner) // int(per_group)
    return ArchSpec("bottleneck", layers, groups, int(inner) // groups * 64 // planes)


def _infer_resnet(state_dict: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    stem = state_dict["conv1.weight"]
    variants = {7: "imagenet", 3: "cifar"}
    if stem.shape[-1] not in variants:
        raise CheckpointError(f"{source}: conv1 kernel {tuple(stem.shape)} is neither 7x7 (imagenet) nor 3x3 (cifar)")
    found = _resnet_arch(state_dict)
    arch = next((name for name, a in ARCHS.items() if a == found), None)
    if arch is None:
        conv2 = state_dict.get("layer1.0.conv2.weight")
        raise CheckpointError(
            f"{source}: torchvision-style ResNet keys, but {found.block} blocks per stage {found.layers}, 3x3 groups "
            f"{found.groups}, width per group {found.width_per_group} (layer1.0.conv2.weight "
            f"{tuple(conv2.shape) if conv2 is not None else '-'}) match no registered architecture; known: "
            + ", ".join(f"{n} {a.block} {a.layers} groups {a.groups} width/group {a.width_per_group}"
                        for n, a in ARCHS.items()))
    return {"arch": arch, "variant": variants[stem.shape[-1]], "num_classes": _classifier(state_dict, "fc.weight", source),
            "width": int(stem.shape[0])}


def _check_consistent(payload: Mapping[str, Any], source: str) -> None:
    """The declared arch/variant/num_classes/classes must describe the weights actually stored."""
    found = infer_spec(payload["state_dict"], source)
    for key in ("arch", "variant", "num_classes"):
        if payload[key] != found[key]:
            raise CheckpointError(f"{source}: declares {key}={payload[key]!r} but its state_dict holds "
                                  f"{key}={found[key]!r} ({found['arch']}, {found['num_classes']} classes, "
                                  f"conv1.weight {tuple(payload['state_dict']['conv1.weight'].shape)}); "
                                  "fix the declaration or pick the matching checkpoint")
    classes = (payload.get("data") or {}).get("classes")
    if classes is not None and len(classes) != payload["num_classes"]:
        raise CheckpointError(f"{source}: data['classes'] lists {len(classes)} names but num_classes="
                              f"{payload['num_classes']}; the checkpoint does not match this dataset")


# Types of the fields every reader relies on; a hand-edited or hostile file that torch.load(weights_only=True)
# reads fine must still be refused naming the field, not fail later with an AttributeError traceback.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "arch": (str,), "variant": (str,), "num_classes": (int,), "input_size": (int, type(None)),
    "epoch": (int, type(None)), "step": (int, type(None)), "optimizer": (Mapping, type(None)),
    "scheduler": (Mapping, type(None)), "rng": (Mapping, type(None)), "config": (Mapping, type(None)),
    "data": (Mapping, type(None)), "metrics": (Mapping, type(None)),
}


def _is_numbers(values: Any) -> bool:
    """A list/tuple (or 1-d tensor) of finite real numbers: what a normalization's mean or std must be."""
    if isinstance(values, torch.Tensor):
        values = values.flatten().tolist()
    return isinstance(values, (list, tuple)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _check_fields(payload: Mapping[str, Any], source: str) -> None:
    """Field types, the state dict's names and tensors, and normalization numbers (see ``_FIELD_TYPES``)."""
    for key, types in _FIELD_TYPES.items():
        if key in payload and (not isinstance(payload[key], types) or isinstance(payload[key], bool)):
            raise CheckpointError(f"{source}: field {key!r} is {payload[key]!r} ({type(payload[key]).__name__}); "
                                  f"expected {' or '.join(t.__name__ for t in types)}: the file is damaged or hand-edited")
    sd = payload["state_dict"]
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{source}: state_dict is a {type(sd).__name__}, not a dict of name -> tensor")
    bad = next(((k, v) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise CheckpointError(f"{source}: state_dict entry {bad[0]!r} holds a {type(bad[1]).__name__}; every entry must "
                              "be a tensor named by a string: the file is damaged or not a model checkpoint")
    norm = payload["normalization"]
    if not isinstance(norm, Mapping) or set(norm) != {"mean", "std"}:
        raise CheckpointError(f"{source}: normalization must be {{'mean': [...], 'std': [...]}}, got {norm!r}")
    if not (_is_numbers(norm["mean"]) and _is_numbers(norm["std"])):
        raise CheckpointError(f"{source}: normalization mean/std must be lists of finite numbers, got {norm!r}; "
                              "pass --normalization cifar10|imagenet|none or --mean/--std to replace them")


def validate_payload(payload: Mapping[str, Any], source: str = "payload") -> None:
    """Check keys, format tag, weights_only safety and that the declared model matches the weights."""
    if not isinstance(payload, Mapping):
        raise CheckpointError(f"{source}: a checkpoint is a dict, got {type(payload).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    unknown = sorted(set(payload) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS))
    if missing or unknown:
        raise CheckpointError(f"{source}: missing keys {missing}, unknown keys {unknown}; "
                              f"allowed: {list(REQUIRED_KEYS + OPTIONAL_KEYS)}")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"{source}: format {payload['format']!r} is not {FORMAT!r}; this version cannot read it")
    _check_fields(payload, source)
    check_weights_only_safe(dict(payload), source)
    _check_consistent(payload, source)


def checkpoint_payload(model: NormalizedNet, **fields: Any) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (arch, variant, classes, normalization, weights) plus ``fields``
    (optimizer, scheduler, epoch, step, rng, config, data, metrics, input_size)."""
    unknown = sorted(set(fields) - set(OPTIONAL_KEYS))
    if unknown:
        raise CheckpointError(f"checkpoint_payload: unknown fields {unknown}; allowed: {list(OPTIONAL_KEYS)}")
    spec = model.spec
    payload = {"format": FORMAT, "arch": spec.arch, "variant": spec.variant, "num_classes": spec.num_classes,
               "normalization": model.normalization, "input_size": INPUT_SIZE[spec.variant],
               "state_dict": model.state_dict()}
    payload.update(fields)
    return payload


# ---------------------------------------------------------------------------------------------------------
# Writing and reading files


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Validate ``payload`` and write it atomically: temp file in the same folder, fsync, ``os.replace``.

    Readers (an evaluation polling for new checkpoints, a resumed run) thus see either the old file or the
    complete new one, never a torn write, even if the process dies mid-save.
    """
    path = Path(path)
    validate_payload(payload, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(payload), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def keep_previous(path: Path, previous: Path) -> None:
    """Make ``previous`` the current content of ``path`` before ``path`` is replaced, without a window in
    which either name is missing or torn: a hard link (no copy; a copy where links are not supported)
    under a temp name, renamed over ``previous``."""
    if not path.is_file():
        return
    tmp = previous.with_name(f".{previous.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copy2(path, tmp)
    os.replace(tmp, previous)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); not possible on every platform, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def read_file(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load`` on CPU, ``weights_only=not trust``, with errors that say what went wrong and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (an interrupted copy?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as exc:
        if trust or "Weights only load failed" not in str(exc):
            raise CheckpointError(f"{path}: cannot unpickle ({exc}); the file is corrupt or not a torch checkpoint") from exc
        wanted = _GLOBAL.search(str(exc))
        what = f"needs the global {wanted.group(1)}" if wanted else "cannot be read with weights_only=True"
        raise CheckpointError(f"{path}: refusing to load: the pickle {what}, which weights_only loading does "
                              f"not allow (it could run code); {TRUST_HINT}") from None
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:200]}); "
                              "the file is truncated or corrupt: copy or save it again") from exc


def load_checkpoint(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """Read a checkpoint (ours or a foreign one) and return it as a validated ``rankshard-checkpoint/1`` dict."""
    return normalize_checkpoint(read_file(path, trust), str(path))


# ---------------------------------------------------------------------------------------------------------
# Foreign formats


def _strip_prefix(state_dict: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Drop ``prefix`` when every key carries it (DataParallel/DDP add ``module.``)."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _cifar_names(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """MadryLab/kuangliu CIFAR ResNet names -> torchvision's: ``shortcut`` -> ``downsample``, ``linear`` -> ``fc``."""
    out = {}
    for key, value in state_dict.items():
        parts = ["downsample" if p == "shortcut" else p for p in key.split(".")]
        if parts[0] == "linear":
            parts[0] = "fc"
        out[".".join(parts)] = value
    return out


def _madry_split(state_dict: Mapping[str, Any], source: str) -> tuple[dict[str, Any], dict[str, list[float]] | None]:
    """MadryLab ``AttackerModel`` state: keep ``model.*`` (the attacker holds a second copy of the same
    weights), and turn ``normalizer.new_mean/new_std`` ([C, 1, 1]) into the normalization dict."""
    weights = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    present = [k for k in ("normalizer.new_mean", "normalizer.new_std") if k in state_dict]
    if not present:
        return weights, None
    if len(present) == 1:
        raise CheckpointError(f"{source}: MadryLab normalizer holds {present[0]} but not its partner (new_mean and "
                              "new_std come together); the file is damaged: use an intact copy")
    norm = {"mean": state_dict["normalizer.new_mean"].flatten().tolist(),
            "std": state_dict["normalizer.new_std"].flatten().tolist()}
    return weights, norm


def _unwrap(obj: Mapping[str, Any]) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``{"model"|"state_dict": sd, "epoch": ...}`` -> (sd, extras); a bare state dict passes through."""
    for key in ("model", "state_dict"):
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            extras = {"epoch": obj["epoch"]} if isinstance(obj.get("epoch"), int) else {}
            return inner, extras
    return obj, {}


def _is_tensor_map(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _is_resnet_layout(state_dict: Mapping[str, Any]) -> bool:
    """torchvision/MadryLab ResNets have a top-level ``bn1`` after the stem; RobustBench's Wide-ResNet
    (``block1.layer.*``) and PreAct-ResNet (no stem BN) keep their own key names."""
    return "block1.layer.0.conv1.weight" not in state_dict and "bn1.weight" in state_dict


def guess_normalization(spec: Mapping[str, Any]) -> str:
    """The preset (``NORMALIZATION_PRESETS``) a foreign file without normalization most likely used:
    torchvision ImageNet models normalize with ImageNet statistics, MadryLab/kuangliu CIFAR ResNets with
    CIFAR-10's, RobustBench's Wide-/PreAct-ResNets take raw [0, 1] inputs ("none")."""
    if spec["arch"] not in ARCHS:
        return "none"
    return "imagenet" if spec["variant"] == "imagenet" else "cifar10"


def _from_foreign(obj: Mapping[str, Any], source: str) -> dict[str, Any]:
    """A torchvision/MadryLab/RobustBench/DDP/wrapped state dict -> our checkpoint dict (spec from weights)."""
    raw, extras = _unwrap(obj)
    if not _is_tensor_map(raw):
        raise CheckpointError(f"{source}: not a rankshard checkpoint and no state dict of tensors found "
                              f"(top-level keys: {list(obj)[:8]})")
    sd = _strip_prefix(raw, "module.")
    kind, norm = "torchvision-state-dict", None
    if any(k.startswith(("model.", "normalizer.", "attacker.")) for k in sd):
        kind = "madrylab-robustness"
        sd, norm = _madry_split(sd, source)
    if _is_resnet_layout(sd):
        sd = _cifar_names(sd)
    else:
        kind = "robustbench-state-dict" if kind == "torchvision-state-dict" else kind
        # TRADES-era WRN files carry an unused sub_block1 (RobustBench builds it with sub_block1=False)
        sd = {k: v for k, v in sd.items() if not k.startswith("sub_block1.")}
    spec = infer_spec(sd, source)
    source_info = {"format": kind, "path": source, "normalization_assumed": norm is None}
    if norm is None:  # the file carries no normalization: the one its family conventionally uses
        guess = source_info["normalization_guess"] = guess_normalization(spec)
        mean, std = NORMALIZATION_PRESETS[guess]
        norm = {"mean": list(mean), "std": list(std)}
    return {"format": FORMAT, "arch": spec["arch"], "variant": spec["variant"], "num_classes": spec["num_classes"],
            "normalization": norm, "input_size": INPUT_SIZE[spec["variant"]], "state_dict": sd,
            "config": {"source": source_info}, **extras}


def normalize_checkpoint(obj: Any, source: str = "<object>") -> dict[str, Any]:
    """Ours (validated as is) or a foreign format (converted), as a ``rankshard-checkpoint/1`` dict."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict (checkpoint or state dict), got {type(obj).__name__}")
    payload = dict(obj) if "format" in obj else _from_foreign(obj, source)
    validate_payload(payload, source)
    return payload


# ---------------------------------------------------------------------------------------------------------
# Building the model

def _normalization_override(payload: dict[str, Any], value: Any) -> None:
    """A preset name (``cifar10``, ``imagenet``, ``none``) or ``{"mean": [...], "std": [...]}``."""
    if isinstance(value, str):
        if value not in NORMALIZATION_PRESETS:
            raise CheckpointError(f"normalization {value!r} is not a preset; choose one of "
                                  f"{sorted(NORMALIZATION_PRESETS)} or give mean and std")
        value = dict(zip(("mean", "std"), NORMALIZATION_PRESETS[value]))
    payload["normalization"] = {"mean": [float(x) for x in value["mean"]], "std": [float(x) for x in value["std"]]}


_OVERRIDES: dict[str, Callable[[dict[str, Any], Any], None]] = {
    "arch": lambda p, v: p.__setitem__("arch", v),
    "variant": lambda p, v: p.__setitem__("variant", v),
    "num_classes": lambda p, v: p.__setitem__("num_classes", int(v)),
    "input_size": lambda p, v: p.__setitem__("input_size", int(v)),
    "normalization": _normalization_override,
    "mean": lambda p, v: p.__setitem__("normalization", {**p["normalization"], "mean": [float(x) for x in v]}),
    "std": lambda p, v: p.__setitem__("normalization", {**p["normalization"], "std": [float(x) for x in v]}),
}
_NORMALIZATION_KEYS = {"normalization", "mean", "std"}


class NormalizationGuessed(UserWarning):
    """A foreign checkpoint records no normalization and none was given: a conventional one is assumed."""


def _note_normalization(payload: dict[str, Any], name: str, given: bool) -> None:
    """Record (config.source) whether normalization was given, and warn when it is only a guess."""
    source = (payload.get("config") or {}).get("source")
    if not isinstance(source, dict) or not source.get("normalization_assumed"):
        return
    if given:
        source["normalization_assumed"] = False
        source["normalization_given"] = True
        return
    norm = payload["normalization"]
    warnings.warn(f"{name}: the file records no input normalization; assuming {source.get('normalization_guess')!r} "
                  f"(mean {norm['mean']}, std {norm['std']}); pass --normalization cifar10|imagenet|none or "
                  "--mean/--std if the model was trained otherwise", NormalizationGuessed, stacklevel=3)


def _check_shapes(model: nn.Module, state_dict: Mapping[str, torch.Tensor], name: str, arch: str) -> None:
    """A clear refusal (not torch's multi-page size-mismatch traceback) when the weights do not fit."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} (expected {expected[k]})" for k in expected if k in got and got[k] != expected[k]]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{name}: the weights do not fit {arch}: {len(missing)} missing keys {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} shape mismatches "
                              f"{wrong[:3]}")


def model_from_checkpoint(source: str | os.PathLike | Mapping[str, Any], trust: bool = False,
                          **overrides: Any) -> tuple[NormalizedNet, dict[str, Any]]:
    """Build the model of a checkpoint (path or already loaded dict) in eval mode, weights loaded strictly.

    ``overrides`` (``arch``, ``variant``, ``num_classes``, ``input_size``, ``normalization`` (a preset name
    or a mean/std dict), ``mean``, ``std``) replace declared fields before validation: e.g. ``mean``/``std``
    for a plain CIFAR state dict trained with other statistics, or ``num_classes=10`` to assert the
    evaluation dataset's class count (a mismatch with the classifier raises ``CheckpointError``). A foreign
    file without normalization and no override warns (``NormalizationGuessed``). Returns ``(model, payload)``.
    """
    name = "<dict>" if isinstance(source, Mapping) else str(source)
    payload = normalize_checkpoint(source, name) if isinstance(source, Mapping) else load_checkpoint(source, trust)
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise CheckpointError(f"model_from_checkpoint: unknown overrides {unknown}; allowed: {sorted(_OVERRIDES)}")
    for key, value in overrides.items():
        _OVERRIDES[key](payload, value)
    validate_payload(payload, name)
    _note_normalization(payload, name, given=bool(_NORMALIZATION_KEYS & set(overrides)))
    width = infer_spec(payload["state_dict"], name)["width"]
    norm = payload["normalization"]
    try:
        model = build_model(payload["arch"], payload["variant"], payload["num_classes"], width, norm["mean"], norm["std"])
    except ValueError as exc:  # the model's own rules (3 normalization values, std > 0, ...) name what is wrong
        raise CheckpointError(f"{name}: cannot build {payload['arch']} with normalization {norm}: {exc}; pass "
                              "--normalization cifar10|imagenet|none or --mean/--std to replace it") from None
    _check_shapes(model, payload["state_dict"], name, payload["arch"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), payload
