"""The typed description of a study, read from one TOML file (``rankshard-study run STUDY.toml``).

A study is: where the data comes from (``[data]``), which variants to materialize (``[materialize]``), what to
train (``[train]``: variants x seeds on a preset with overrides) and which evaluations to run on every
checkpoint (``[[evaluate]]``: any ``rankshard-evaluate`` command with its own option names). Unknown keys fail
loudly with the allowed ones, like the other stages' configs (STYLE: config is a typed object).
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rankshard.evaluate.errors import EvaluationError

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the same parser from PyPI (setup.cfg installs it there)
    import tomli as tomllib

SOURCES = ("demo", "cifar10", "imagenet", "folder")


class StudyConfigError(EvaluationError):
    """A study file that cannot run as written (the message names the key and the fix)."""


def _items(value: Any) -> tuple:
    """TOML tables become sorted (key, value) tuples, lists tuples: hashable and order-independent."""
    if isinstance(value, dict):
        return tuple(sorted((k, _items(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_items(v) for v in value)
    return value


def _plain(value: Any) -> Any:
    """Back from ``_items`` to JSON-friendly lists and dicts (for hashing and config.json)."""
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                  for v in value):
        return {k: _plain(v) for k, v in value}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


_KINDS = {str: "text", int: "a whole number", bool: "true or false"}


def _is(value: Any, kind: type) -> bool:
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))  # true is no number


def _check(value: Any, hint: Any, where: str) -> None:
    """``value`` as read from TOML against a field's type: ``str``, ``int``, ``bool``, ``tuple[X, ...]`` (a list of
    X) or a bare ``tuple`` (a table); anything else is refused naming the key, before it fails somewhere later."""
    if hint is tuple:
        ok, what = isinstance(value, dict), "a table, e.g. { epochs = 1 }"
    elif typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        ok, what = isinstance(value, list) and all(_is(v, item) for v in value), f"a list of {_KINDS[item]}"
    else:
        ok, what = _is(value, hint), _KINDS[hint]
    if not ok:
        raise StudyConfigError(f"{where} = {value!r}: expected {what}")


def _build(cls, table: dict, where: str):
    """``cls(**table)`` with unknown keys and values of another type refused, and list/table values frozen."""
    if not isinstance(table, dict):
        raise StudyConfigError(f"{where} = {table!r}: expected a table, a [{where}] section of key = value lines")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise StudyConfigError(f"[{where}]: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    hints = typing.get_type_hints(cls)
    for key, value in table.items():
        _check(value, hints[key], f"[{where}] {key}")
    return cls(**{k: _items(v) for k, v in table.items()})


@dataclass(frozen=True)
class DataConfig:
    """The dataset source: ``demo`` (synthetic CIFAR-format archive, offline), ``cifar10`` (archive at
    ``path``), ``imagenet``/``folder`` (``rankshard-preprocess imagenet``/``folder`` on ``path``)."""

    source: str = "demo"
    path: str = ""
    dataset: str = "cifar10"
    splits: tuple[str, ...] = ("train", "test")
    per_class: int = 30        # demo: training images per class (10 classes)
    test_per_class: int = 20   # demo: test images per class
    args: tuple[str, ...] = ()  # extra rankshard-preprocess flags, e.g. ["--devkit", "/data/devkit"]

    def __post_init__(self):
        if self.source not in SOURCES:
            raise StudyConfigError(f"[data] source = {self.source!r}: choose one of {', '.join(SOURCES)}")
        if self.source != "demo" and not self.path:
            raise StudyConfigError(f"[data] source = {self.source!r} needs path = the dataset's archive or folder")


@dataclass(frozen=True)
class MaterializeConfig:
    """``rankshard-preprocess`` variant options (same names): one pass writes every listed variant."""

    ranks: tuple[int, ...] = ()
    high: tuple[int, ...] = ()
    lowpass: tuple[int, ...] = ()
    highpass: tuple[int, ...] = ()
    encoding: str = "png"
    backend: str = "auto"
    shard_size: int = 0  # 0: the command's default
    args: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainSpec:
    """Every (variant, seed) is one ``rankshard-train`` run of ``preset`` with ``overrides`` (TrainConfig fields)."""

    variants: tuple[str, ...] = ("full",)
    seeds: tuple[int, ...] = (0,)
    preset: str = "cifar10-paper"
    overrides: tuple = ()
    checkpoint: str = "best.pt"  # the file evaluated (best.pt: selected on the full-rank test split)

    def __post_init__(self):
        if not self.variants or not self.seeds:
            raise StudyConfigError("[train] needs at least one variant and one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise StudyConfigError(f"[train] seeds {list(self.seeds)}: list each seed once")


@dataclass(frozen=True)
class Evaluation:
    """One ``rankshard-evaluate COMMAND`` run on every checkpoint; ``options`` are its flags by their names
    (``eps = "4/255"`` -> ``--eps 4/255``; true -> ``--flag``, false -> ``--no-flag``; lists repeat the flag)."""

    name: str
    command: str
    split: str = "test"
    options: tuple = ()


@dataclass(frozen=True)
class StudyConfig:
    name: str
    data: DataConfig
    materialize: MaterializeConfig
    train: TrainSpec
    evaluations: tuple[Evaluation, ...]
    device: str = "auto"
    report: bool = True


def _evaluation(table: dict, i: int) -> Evaluation:
    if not isinstance(table, dict):
        raise StudyConfigError(f"[[evaluate]] #{i + 1} = {table!r}: expected a table, an [[evaluate]] section")
    table = dict(table)
    if "command" not in table:
        raise StudyConfigError(f"[[evaluate]] #{i + 1}: command = accuracy | spectrum | pgd | rig | weights ...")
    for key in ("name", "command", "split"):
        if key in table:
            _check(table[key], str, f"[[evaluate]] #{i + 1} {key}")
    name = table.pop("name", table["command"])
    fixed = {k: table.pop(k) for k in ("command", "split") if k in table}
    return Evaluation(name=name, options=_items(table), **fixed)


def parse_study(text: str, where: str = "study") -> StudyConfig:
    """A ``StudyConfig`` from TOML text; every table checked for unknown keys."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{where}: not valid TOML ({exc})") from None
    top = {"name", "device", "report", "data", "materialize", "train", "evaluate"}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise StudyConfigError(f"{where}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(top))}")
    for key, kind in (("name", str), ("device", str), ("report", bool)):
        if key in doc:
            _check(doc[key], kind, key)
    if not isinstance(doc.get("evaluate", []), list):
        raise StudyConfigError(f"{where}: evaluate = {doc['evaluate']!r}; write each evaluation as an [[evaluate]] "
                               "section")
    evals = tuple(_evaluation(t, i) for i, t in enumerate(doc.get("evaluate", [])))
    names = [e.name for e in evals]
    if len(set(names)) != len(names):
        raise StudyConfigError(f"{where}: [[evaluate]] names {names} repeat; give each a distinct name = ...")
    return StudyConfig(name=doc.get("name", Path(where).stem), data=_build(DataConfig, doc.get("data", {}), "data"),
                       materialize=_build(MaterializeConfig, doc.get("materialize", {}), "materialize"),
                       train=_build(TrainSpec, doc.get("train", {}), "train"), evaluations=evals,
                       device=doc.get("device", "auto"), report=doc.get("report", True))


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise StudyConfigError(f"{path}: no such study file; examples: `rankshard-study examples`")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # TOML is UTF-8; a Windows editor may leave a byte-order mark
    except UnicodeDecodeError as exc:
        raise StudyConfigError(f"{path}: not UTF-8 text ({exc}); save the study file as UTF-8") from None
    return parse_study(text, str(path))


def plain(value: Any) -> Any:
    """A frozen config value as JSON (dicts and lists)."""
    return _plain(value)
