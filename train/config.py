"""``TrainConfig``: the one typed object that describes a training run, its presets and overrides.

A run is fully described by a frozen ``TrainConfig``: a preset (``PRESETS``) gives every field a value, the
command line overrides any of them (``apply_overrides``), ``validate`` checks the combination once, and
the resolved config is printed and written to ``RUN_DIR/config.json``. A run folder whose saved config
differs (outside ``RUNTIME_FIELDS``) is refused unless ``--overwrite``.

Units: ``batch_size`` is the *global* batch of one optimizer step (all ranks, all accumulation chunks), so
a preset means the same optimization on one GPU or eight; ``lr`` is the peak learning rate for that batch
(``lr_reference_batch`` rescales it linearly when the batch is changed, as He et al.'s "0.1 per 256");
epochs, milestones and warmup are in epochs and applied per optimizer step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping

from rankshard.preprocess.errors import RankshardError
from rankshard.train.attacks import STEPS, parse_eps
from rankshard.train.models import ARCHS, VARIANTS


class ConfigError(RankshardError, ValueError):
    """A training configuration is invalid or conflicts with a run folder; the message says the fix."""


def _f(default: Any, help: str, flags: tuple[str, ...] = ()) -> Any:
    """A field with its command-line help text (the CLI builds one option per field from these); ``flags``
    overrides the option names where the CLI-wide name differs from the field's (``--data`` for ``data_root``)."""
    return field(default=default, metadata={"help": help, "flags": flags})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (see the module docstring for units)."""

    # data (shards from rankshard-preprocess: DATA_ROOT/<dataset>/<split>/<variant>/)
    # The option is --data, as in rankshard-evaluate; --data-root (the first release's name) still works.
    data_root: str = _f("shards", "root of rankshard-preprocess output: ROOT/<dataset>/<split>/<variant>/",
                        flags=("--data", "--data-root"))
    dataset: str = _f("cifar10", "dataset folder under data_root (cifar10, imagenet, ...)")
    train_variant: str = _f("full", "training variant: full, rank-005, high-003, ...")
    test_variant: str = _f("full", "variant of the test split that picks best.pt (the paper: full rank)")
    extra_variants: tuple[str, ...] = _f((), "more test variants evaluated each epoch")
    augment: str = _f("auto", "loader augmentation: auto (by dataset), cifar, imagenet, none")
    workers: int = _f(4, "loader worker processes per rank")
    verify_shards: bool = _f(True, "check every shard's sha256 against its manifest once per process before "
                                   "reading it (--no-verify-shards: skip; ~0.5-1 s per GB per process)")
    # model
    arch: str = _f("resnet50", "resnet18, resnet34, resnet50, resnet101")
    model_variant: str = _f("cifar", "stem: cifar (3x3/1, no max-pool) or imagenet (7x7/2 + max-pool)")
    width: int = _f(64, "base channels (torchvision: 64); tiny values for tests")
    zero_init_residual: bool = _f(False, "zero the last BN gamma of each block (Goyal et al.)")
    sync_bn: bool = _f(False, "SyncBatchNorm under DDP (per-rank BN statistics otherwise)")
    # optimization
    epochs: int = _f(350, "training epochs")
    batch_size: int = _f(128, "global images per optimizer step")
    accum_steps: int = _f(1, "each rank's batch is split into this many forward/backward chunks")
    lr: float = _f(0.1, "peak lr for batch_size (or per lr_reference_batch images)")
    lr_reference_batch: int = _f(0, "0: lr is absolute; N: lr applies per N images (scaled linearly)")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(False, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "L2 weight decay (SGD-coupled)")
    wd_on_norm_and_bias: bool = _f(True, "False: no decay on BatchNorm weights/biases and conv/fc biases")
    schedule: str = _f("multistep", "multistep, cosine, onecycle")
    milestones: tuple[float, ...] = _f((150.0, 250.0), "epochs (multistep)")
    gamma: float = _f(0.1, "lr factor at each milestone")
    warmup_epochs: float = _f(0.0, "linear warmup from warmup_start * lr")
    warmup_start: float = _f(0.1, "warmup starts at warmup_start * lr")
    final_lr_ratio: float = _f(0.0, "cosine/onecycle end at final_lr_ratio * lr")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy")
    # adversarial training (Madry PGD-AT); adv_norm "" disables it
    adv_norm: str = _f("", "PGD adversarial training: linf or l2 (empty: off)")
    adv_eps: str = _f("8/255", "PGD radius in [0, 1] pixel units; fractions allowed (8/255)")
    adv_steps: int = _f(7, "PGD steps per training batch")
    adv_step_size: str = _f("", "PGD step size (empty: 2.5 * eps / steps)")
    # runtime
    precision: str = _f("auto", "auto (bf16 on CUDA, fp32 on CPU), bf16, fp32")
    channels_last: str = _f("auto", "auto (on CUDA), on, off")
    compile: bool = _f(False, "torch.compile the training model")
    device: str = _f("auto", "auto, cpu, cuda")
    seed: int = _f(0, "seed of initialization, data order and PGD starts")
    eval_batch_size: int = _f(500, "evaluation batch per process")
    save_every: int = _f(0, "also keep epoch-NNNN.pt every N epochs (0: never)")
    log_every: int = _f(50, "optimizer steps between progress lines and NaN checks")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def adv_enabled(self) -> bool:
        return bool(self.adv_norm)


# Fields that change how fast a run goes, not what it computes (bit-for-bit on CPU; the GPU kernels chosen
# may differ): they may differ between a run folder's config and the resuming command.
RUNTIME_FIELDS = ("workers", "compile", "eval_batch_size", "log_every", "device", "verify_shards")

FIELD_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(TrainConfig)}

# The paper's CIFAR-10 recipe (Jere et al., following Madry et al.'s robustness library).
_CIFAR10_PAPER = TrainConfig()

PRESETS: dict[str, TrainConfig] = {
    "cifar10-paper": _CIFAR10_PAPER,
    # He et al. 2016 / torchvision reference: 90 epochs, lr 0.1 per 256 images, /10 at epochs 30 and 60.
    "imagenet-paper": replace(
        _CIFAR10_PAPER, dataset="imagenet", model_variant="imagenet", epochs=90, batch_size=256, lr=0.1,
        lr_reference_batch=256, weight_decay=1e-4, milestones=(30.0, 60.0), workers=8, eval_batch_size=250),
    # Short modern CIFAR-10 schedule (design in the README; unmeasured on real CIFAR-10 so far): one-cycle
    # with linear warmup, Nesterov, label smoothing, no decay on BN/bias, zero-init residuals, bf16 +
    # channels_last on CUDA, batch 512 (lr 0.4 = 0.1 per 128 images, linear scaling).
    "cifar10-fast": replace(
        _CIFAR10_PAPER, epochs=30, batch_size=512, lr=0.4, nesterov=True, weight_decay=5e-4,
        wd_on_norm_and_bias=False, schedule="onecycle", milestones=(), warmup_epochs=3.0, warmup_start=0.1,
        final_lr_ratio=0.0, label_smoothing=0.1, zero_init_residual=True, workers=8),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": tuple(ARCHS), "model_variant": VARIANTS, "schedule": ("multistep", "cosine", "onecycle"),
    "precision": ("auto", "bf16", "fp32"), "channels_last": ("auto", "on", "off"),
    "device": ("auto", "cpu", "cuda"), "adv_norm": ("", *STEPS), "augment": ("auto", "cifar", "imagenet", "none"),
}


def parse_field(name: str, text: str) -> Any:
    """Parse a command-line string into field ``name``'s type (tuples: comma-separated; bools: true/false)."""
    if name not in FIELD_TYPES:
        raise ConfigError(f"unknown config field {name!r}; fields: {', '.join(FIELD_TYPES)}")
    kind = FIELD_TYPES[name]
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(text)
            return lowered in ("true", "1", "yes", "on")
        if kind is tuple:
            items = [t for t in text.replace(" ", "").split(",") if t]
            return tuple(float(t) for t in items) if name == "milestones" else tuple(items)
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name.replace('_', '-')} {text!r}: expected a {kind.__name__}") from None


def apply_overrides(cfg: TrainConfig, overrides: Mapping[str, Any]) -> TrainConfig:
    """``cfg`` with fields replaced; string values are parsed into the field's type."""
    values = {}
    for name, value in overrides.items():
        if name not in FIELD_TYPES:
            raise ConfigError(f"unknown config field {name!r}; fields: {', '.join(FIELD_TYPES)}")
        values[name] = parse_field(name, value) if isinstance(value, str) and FIELD_TYPES[name] is not str else value
    return validate(replace(cfg, **values))


def from_preset(preset: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The preset ``preset`` with ``overrides`` applied and validated."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return apply_overrides(PRESETS[preset], overrides or {})


def from_json(data: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a config saved by ``TrainConfig.to_json`` (unknown keys fail loudly)."""
    unknown = sorted(set(data) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(f"config.json has unknown fields {unknown}; written by another version of rankshard?")
    values = {k: tuple(v) if FIELD_TYPES[k] is tuple else v for k, v in data.items()}
    return validate(TrainConfig(**values))


def _check_positive(cfg: TrainConfig) -> None:
    for name in ("epochs", "batch_size", "accum_steps", "eval_batch_size", "log_every", "adv_steps"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("lr", "weight_decay", "momentum", "warmup_epochs", "warmup_start", "final_lr_ratio", "gamma"):
        value = getattr(cfg, name)
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    if cfg.save_every < 0 or cfg.workers < 0 or cfg.lr_reference_batch < 0:
        raise ConfigError("--save-every, --workers and --lr-reference-batch must be >= 0")


def _check_schedule(cfg: TrainConfig) -> None:
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs} exceeds --epochs {cfg.epochs}")
    if cfg.schedule == "onecycle" and cfg.warmup_epochs <= 0:
        raise ConfigError("--schedule onecycle needs --warmup-epochs > 0 (the rising half of the cycle)")
    if list(cfg.milestones) != sorted(cfg.milestones):
        raise ConfigError(f"--milestones {cfg.milestones} must be increasing")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"--label-smoothing {cfg.label_smoothing} must lie in [0, 1)")
    if cfg.nesterov and cfg.momentum == 0:
        raise ConfigError("--nesterov needs --momentum > 0")


def _check_adversarial(cfg: TrainConfig) -> None:
    if not cfg.adv_enabled:
        return
    try:
        eps = parse_eps(cfg.adv_eps)
        step = parse_eps(cfg.adv_step_size) if cfg.adv_step_size else None
    except ValueError as exc:
        raise ConfigError(f"--adv-eps/--adv-step-size: {exc}") from None
    if cfg.adv_norm == "linf" and eps > 1:
        raise ConfigError(f"--adv-eps {cfg.adv_eps}: L-inf eps is in [0, 1] pixel units (8/255, not 8)")
    if eps <= 0 or (step is not None and step <= 0):
        raise ConfigError("--adv-eps and --adv-step-size must be > 0 for adversarial training")


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check field choices and combinations; return ``cfg`` unchanged or raise ``ConfigError``."""
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        expected = FIELD_TYPES[f.name]
        ok = isinstance(value, expected) or (expected is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"field {f.name}: expected {expected.__name__}, got {value!r}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {list(choices)}")
    _check_positive(cfg)
    _check_schedule(cfg)
    _check_adversarial(cfg)
    return cfg


def differences(saved: TrainConfig, new: TrainConfig, ignore: tuple[str, ...] = RUNTIME_FIELDS) -> dict[str, tuple]:
    """``{field: (saved, new)}`` for fields that differ, outside ``ignore``."""
    return {f.name: (getattr(saved, f.name), getattr(new, f.name)) for f in fields(TrainConfig)
            if f.name not in ignore and getattr(saved, f.name) != getattr(new, f.name)}


def config_hash(cfg: TrainConfig) -> str:
    """sha256 (16 hex digits) of the config without ``RUNTIME_FIELDS``: identifies what a run computes."""
    body = {k: v for k, v in cfg.to_json().items() if k not in RUNTIME_FIELDS}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def dataclass_fields() -> tuple[dataclasses.Field, ...]:
    """The fields of ``TrainConfig`` in declaration order (the CLI builds one option per field)."""
    return fields(TrainConfig)
