"""Result files: CSV for spreadsheets, JSON (with provenance) for ``rankshard-evaluate report``."""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "rankshard-eval/1"  # every result JSON carries it, with "kind" (accuracy | spectrum | pgd)


def provenance(device: str | torch.device, world_size: int = 1) -> dict[str, Any]:
    """Where and with what a result was computed (SPEC: results carry their hardware and versions)."""
    device = str(device)
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else platform.processor()
    return {"device": device, "device_name": name or platform.machine(), "world_size": world_size,
            "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


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


def read_results(folders: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """Every result JSON (``format`` == FORMAT) under the folders, recursively, with its ``path`` added."""
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.json")):
            try:
                obj = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # not ours (a manifest being written, an editor's file): the report lists only results
            if isinstance(obj, dict) and obj.get("format") == FORMAT:
                found.append({**obj, "path": str(path)})
    return found


def safe_name(name: str) -> str:
    """A checkpoint label usable in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
