"""The result contract of ``rankshard-evaluate``: CSV for spreadsheets, one JSON summary per result for ``report``.

Every subcommand writes its summary through ``write_result`` and nothing else, so ``report`` can read them all:

* file name: ``OUT/<kind>.json``, or ``OUT/<kind>-<qualifier>.json`` when one run writes several results of a
  kind (spectrum: ``spectrum-<mode>-<checkpoint>.json``);
* body: ``{"format": "rankshard-eval/1", "kind", "config", "provenance", "figures", "files", ...}`` where
  ``kind`` is one of accuracy | spectrum | pgd | robustness | rig | weights | svd-profile (``report.RENDERERS``),
  ``config`` the resolved options, ``provenance`` versions and device (``provenance``), ``figures`` the PNGs
  the result owns and ``files`` its other outputs (JSON/CSV/NPY side files), both relative to the JSON's folder.

``report`` renders each kind, and lists (never drops) a JSON it cannot read, one of an unknown kind, and a
JSON that is neither a result nor a file some result lists as its own.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "rankshard-eval/1"  # every result JSON carries it, with "kind"


def provenance(device: str | torch.device, world_size: int = 1) -> dict[str, Any]:
    """Where and with what a result was computed (SPEC: results carry their hardware and versions)."""
    from rankshard import __version__

    device = str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": name or platform.machine(), "world_size": world_size,
            "rankshard": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def result_path(out: str | os.PathLike, kind: str, qualifier: str = "") -> Path:
    """``OUT/<kind>.json`` or ``OUT/<kind>-<qualifier>.json`` (the module's naming convention)."""
    return Path(out) / (f"{kind}-{safe_name(qualifier)}.json" if qualifier else f"{kind}.json")


def _relative(paths: Sequence[str | os.PathLike], folder: Path) -> list[str]:
    return [os.path.relpath(p, folder) for p in paths]


def write_result(out: str | os.PathLike, kind: str, body: Mapping[str, Any], *, config: Mapping[str, Any],
                 device: str | torch.device, world_size: int = 1, qualifier: str = "",
                 figures: Sequence[str | os.PathLike] = (), files: Sequence[str | os.PathLike] = ()) -> Path:
    """Write one result summary (see the module docstring); returns its path."""
    path = result_path(out, kind, qualifier)
    head = {"config": dict(config), "provenance": provenance(device, world_size),
            "figures": _relative(figures, path.parent), "files": _relative(files, path.parent)}
    return write_json(path, kind, {**head, **body})


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # a reader (report) never sees half a file


def write_json(path: str | os.PathLike, kind: str, body: Mapping[str, Any]) -> Path:
    """``{"format", "kind", **body}`` as indented JSON."""
    path = Path(path)
    _atomic_write(path, json.dumps({"format": FORMAT, "kind": kind, **body}, indent=1, default=_plain) + "\n")
    return path


def _plain(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Rows (dicts with the same keys) as CSV with a header; floats at full precision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Skipped:
    """A file the report did not render, and why (shown on the page and on stderr)."""

    path: str
    reason: str


def _json_files(sources: Sequence[str | os.PathLike]) -> list[Path]:
    files = []
    for src in map(Path, sources):
        files += sorted(src.rglob("*.json")) if src.is_dir() else [src]
    unique: dict[Path, Path] = {}  # one file reached twice (a folder given absolute and relative) is read once
    for f in files:
        unique.setdefault(f.resolve(), f)
    return list(unique.values())


def _owned(results: Sequence[dict[str, Any]]) -> set[Path]:
    """Side files that results list as theirs (``files``), resolved: not results, but not strays either."""
    return {(Path(r["path"]).parent / f).resolve() for r in results for f in r.get("files", ())}


def read_results(sources: Sequence[str | os.PathLike]) -> tuple[list[dict[str, Any]], list[Skipped]]:
    """Every result JSON in ``sources`` (files, or folders searched recursively), with ``path`` added, and the
    JSON files that are not results: unreadable, or another format and not listed by any result."""
    results, unreadable, foreign = [], [], []
    for path in _json_files(sources):
        try:
            obj = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            unreadable.append(Skipped(str(path), f"unreadable ({type(exc).__name__}: {exc})"))
            continue
        if isinstance(obj, dict) and obj.get("format") == FORMAT:
            results.append({**obj, "path": str(path)})
        else:
            fmt = obj.get("format") if isinstance(obj, dict) else None
            foreign.append(Skipped(str(path), f"not a {FORMAT} result (format {fmt!r}) and no result lists it"))
    owned = _owned(results)
    return results, unreadable + [s for s in foreign if Path(s.path).resolve() not in owned]


def safe_name(name: str) -> str:
    """A checkpoint label usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
