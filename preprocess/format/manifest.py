"""``manifest.json`` per variant folder, assembled from the per-shard records once all shards exist."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np

from rankshard import __version__ as VERSION
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.ecosystem import ecosystem_files
from rankshard.preprocess.format.transport import is_url, read_text
from rankshard.preprocess.spec import FORMAT, Layout
from rankshard.preprocess.format.variants import Variant


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def read_json(path: Path | str) -> dict:
    """A JSON file, local or at a URL (a missing remote object stays a ``MissingError``)."""
    try:
        return json.loads(read_text(str(path)) if is_url(path) else Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankshardError(f"{path}: unreadable ({exc}); delete it and rerun the command that made it") from exc


# What readers take from a manifest.json (loaders, verify, preview) and the JSON type of each: a damaged file (a
# flipped byte in a key, a hand edit) is named as such, not a KeyError or TypeError where a field is first used
_FIELDS = {"shards": list, "num_samples": int, "mode": str, "rank": (int, type(None)), "encoding": str,
           "config": dict, "classes": list, "image_size": list, "dataset": str, "split": str, "variant": str}
_SHARD_FIELDS = {"name": str, "num_samples": int, "bytes": int, "sha256": str}


def _wrong(record: dict, fields: dict) -> list[str]:
    """The ``fields`` missing from ``record`` or of another JSON type (a count must be a whole number >= 0)."""
    return [k for k, kind in fields.items() if k not in record or isinstance(record[k], bool)
            or not isinstance(record[k], kind) or (kind is int and record[k] < 0)]


def _unusable(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in _FIELDS if k not in manifest]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = _wrong(manifest, _FIELDS)
    if "image_size" not in wrong and not (len(manifest["image_size"]) == 2 and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in manifest["image_size"])):
        wrong.append("image_size")
    if wrong:
        return f"{', '.join(wrong)} of another type than rankshard writes"
    for i, shard in enumerate(manifest["shards"]):
        wrong = _wrong(shard, _SHARD_FIELDS) if isinstance(shard, dict) else list(_SHARD_FIELDS)
        if not wrong and (shard["name"] in ("", ".", "..") or "/" in shard["name"]):
            wrong = ["name (a file in this folder)"]
        if wrong:
            return f"shard entry {i} has no usable {', '.join(wrong)}"
    return None


def manifest_problem(path: str, manifest) -> str | None:
    """Why the parsed manifest.json at ``path`` cannot be read (a field missing or of another type), as the message
    that names it and the fix; None when it can. Its format tag is the callers' to check."""
    what = _unusable(manifest)
    return None if what is None else (f"{path}: incomplete manifest ({what}); delete it and rerun the preprocess "
                                      "command that made it")


def _local_bytes(shard: Path) -> int | None:
    return shard.stat().st_size if shard.exists() else None


def _shard_record(layout: Layout, variant: Variant, index: int, digest: str, shard_bytes=_local_bytes) -> dict:
    path = layout.record_path(variant, index)
    shard = layout.shard_path(variant, index)
    size = shard_bytes(shard)
    if size is None:
        raise RankshardError(f"{shard}: missing; rerun the same command to write it")
    if path.exists():
        record = read_json(path)
        if record.get("config_hash") == digest and record["bytes"] == size:
            return record
    raise RankshardError(f"{shard}: no matching record in {path.parent}; rerun the same command to rewrite it")


def _aggregate(records: list[dict], num_classes: int, n: int) -> dict:
    counts = np.sum([r["stats"]["class_counts"] for r in records], axis=0)
    energy = np.sum([r["stats"]["energy_sum"] for r in records], axis=0) / max(n, 1)
    return {
        "class_counts": [int(c) for c in counts] if len(counts) else [0] * num_classes,
        "energy_mean": [round(float(e), 6) for e in np.atleast_1d(energy)],
        "clip_fraction_mean": sum(r["stats"]["clip_fraction_sum"] for r in records) / max(n, 1),
        "leak_mean": sum(r["stats"]["leak_sum"] for r in records) / max(n, 1),
        "leak_max": max((r["stats"]["leak_max"] for r in records), default=0.0),
    }


def finalize_manifests(layout: Layout, variants: list[Variant], num_shards: int, source, cfg: dict, digest: str,
                       svd: dict, stats: dict, num_samples: int, image_size: tuple[int, int],
                       errors: list | None = None, shard_bytes=_local_bytes) -> dict[str, dict]:
    """Write ``manifest.json`` into every variant folder (idempotent; any process may call it), and beside it
    the ecosystem files (wids index, dataset card). ``shard_bytes(path)``: a shard's size, None if it is
    missing (object storage checks its objects, not the local staging folder)."""
    manifests = {}
    for v in variants:
        records = [_shard_record(layout, v, i, digest, shard_bytes) for i in range(num_shards)]
        agg = _aggregate(records, len(source.classes), num_samples)
        if sum(r["num_samples"] for r in records) != num_samples:
            raise RankshardError(f"{layout.variant_dir(v)}: shard sample counts do not add up to {num_samples}")
        manifest = {
            "format": FORMAT, "dataset": layout.dataset, "split": layout.split, "variant": v.name,
            "mode": v.mode, "rank": v.rank, "encoding": v.encoding,
            "png_compress_level": cfg["png_level"] if v.encoding == "png" else None,
            "image_size": list(image_size), "num_samples": num_samples, "classes": list(source.classes),
            "class_counts": agg.pop("class_counts"),
            "shards": [{k: r[k] for k in ("name", "num_samples", "bytes", "sha256")} for r in records],
            "source": dict(source.info), "config": cfg, "config_hash": digest, "svd": svd,
            "quantization": agg, "errors": list(errors or []), "stats": stats, "version": VERSION,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
        }
        for name, data in ecosystem_files(manifest).items():  # wids index, HF card: deterministic bytes
            _write_bytes(layout.variant_dir(v) / name, data)
        write_json(layout.variant_dir(v) / "manifest.json", manifest)
        manifests[v.name] = manifest
    return manifests
