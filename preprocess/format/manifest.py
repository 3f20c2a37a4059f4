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


def _is(value, kind) -> bool:
    """Whether ``value`` is of JSON type ``kind`` (true is no number, and no count is below zero)."""
    return isinstance(value, kind) and not isinstance(value, bool) and not (kind is int and value < 0)


def _wrong(record: dict, fields: dict) -> list[str]:
    """The ``fields`` missing from ``record`` or of another JSON type."""
    return [k for k, kind in fields.items() if k not in record or not _is(record[k], kind)]


def _unusable(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    missing = [k for k in _FIELDS if k not in manifest]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = _wrong(manifest, _FIELDS)
    if "image_size" not in wrong and not (len(manifest["image_size"]) == 2 and all(
            _is(n, int) and n > 0 for n in manifest["image_size"])):
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


# a per-shard record (``.progress/<shard>.json``): what the manifest takes from it, and of which JSON type
_RECORD_FIELDS = {**_SHARD_FIELDS, "config_hash": str, "stats": dict}
_STATS_FIELDS = {"class_counts": list, "energy_sum": list, "clip_fraction_sum": (int, float), "leak_sum": (int, float),
                 "leak_max": (int, float)}


def _record_fits(record, digest: str, size: int, num_classes: int) -> bool:
    if not isinstance(record, dict) or _wrong(record, _RECORD_FIELDS) or _wrong(record["stats"], _STATS_FIELDS) \
            or not isinstance(record.get("errors", []), list):
        return False
    counts, energy = record["stats"]["class_counts"], record["stats"]["energy_sum"]
    return record["config_hash"] == digest and record["bytes"] == size and len(counts) == num_classes and \
        len(energy) == 3 and all(_is(c, int) for c in counts) and all(_is(e, (int, float)) for e in energy)


def shard_record(layout: Layout, variant: Variant, index: int, digest: str, num_classes: int,
                 shard_bytes=_local_bytes) -> dict | None:
    """The record of shard ``index`` of ``variant`` where the shard exists and the record stands for it (made with
    this configuration, ``digest``, of the shard's size, every field the manifest takes in place); else None, and
    the shard is written again: a damaged record is not reported forever by a rerun that skips its shard."""
    path = layout.record_path(variant, index)
    size = shard_bytes(layout.shard_path(variant, index))
    if size is None or not path.exists():
        return None
    try:
        record = read_json(path)
    except RankshardError:
        return None
    return record if _record_fits(record, digest, size, num_classes) else None


def _shard_record(layout: Layout, variant: Variant, index: int, digest: str, num_classes: int,
                  shard_bytes=_local_bytes) -> dict:
    shard = layout.shard_path(variant, index)
    record = shard_record(layout, variant, index, digest, num_classes, shard_bytes)
    if record is None:
        if shard_bytes(shard) is None:
            raise RankshardError(f"{shard}: missing; rerun the same command to write it")
        raise RankshardError(f"{shard}: no matching record in {layout.record_path(variant, index).parent}; rerun "
                             "the same command to rewrite it")
    return record


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
                       svd: dict, stats: dict, image_size: tuple[int, int],
                       shard_bytes=_local_bytes) -> dict[str, dict]:
    """Write ``manifest.json`` into every variant folder (idempotent; any process may call it), and beside it
    the ecosystem files (wids index, dataset card). ``shard_bytes(path)``: a shard's size, None if it is
    missing (object storage checks its objects, not the local staging folder). The sample count and the
    inputs skipped (``errors``) are the first variant's records'."""
    manifests, num_samples, errors = {}, None, []
    for v in variants:
        records = [_shard_record(layout, v, i, digest, len(source.classes), shard_bytes) for i in range(num_shards)]
        if num_samples is None:
            num_samples = sum(r["num_samples"] for r in records)
            errors = [e for r in records for e in r.get("errors", [])]
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
            "quantization": agg, "errors": list(errors), "stats": stats, "version": VERSION,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
        }
        for name, data in ecosystem_files(manifest).items():  # wids index, HF card: deterministic bytes
            _write_bytes(layout.variant_dir(v) / name, data)
        write_json(layout.variant_dir(v) / "manifest.json", manifest)
        manifests[v.name] = manifest
    return manifests
