"""The worker side of materialization: encode one shard's samples for every variant and write them.

This module imports no torch, so worker processes start fast and stay small.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rankshard.preprocess.format.tar import ShardRecord, write_shard
from rankshard.preprocess.format.variants import Variant, shard_samples


@dataclass
class ShardJob:
    """One shard index: its samples' metadata and, per variant, the arrays to encode."""

    index: int
    shard_name: str
    variants: list[Variant]
    dirs: dict[str, str]            # variant name -> folder
    payloads: dict[str, dict]       # variant name -> {"image"|"u"|"s"|"v", "energy", "clip_fraction", "leak"}
    meta: dict                      # "key", "index", "label", "source", "class_name", "height", "width", "errors"
    png_level: int
    config_hash: str
    num_classes: int


def _write_variant(job: ShardJob, variant: Variant) -> ShardRecord:
    payload, meta = job.payloads[variant.name], job.meta
    folder = Path(job.dirs[variant.name])
    return write_shard(folder / job.shard_name, shard_samples(variant, payload, meta, job.png_level))


def _shard_stats(job: ShardJob, variant: Variant) -> dict:
    payload = job.payloads[variant.name]
    counts = np.bincount(np.asarray(job.meta["label"]), minlength=job.num_classes)
    return {
        "class_counts": counts.tolist(),
        "energy_sum": np.asarray(payload["energy"], dtype=np.float64).sum(axis=0).tolist(),
        "clip_fraction_sum": float(np.sum(payload["clip_fraction"])),
        "leak_sum": float(np.sum(payload["leak"])),
        "leak_max": float(np.max(payload["leak"], initial=0.0)),
    }


def write_shard_job(job: ShardJob) -> tuple[int, float, list[dict]]:
    """Write every variant of one shard; returns (index, seconds, per-variant records)."""
    start = time.perf_counter()
    records = []
    for variant in job.variants:
        record = _write_variant(job, variant)
        entry = {**asdict(record), "stats": _shard_stats(job, variant), "config_hash": job.config_hash,
                 "errors": job.meta.get("errors", [])}  # inputs skipped in this shard, for the manifest
        sidecar = Path(job.dirs[variant.name]) / ".progress" / f"{job.shard_name}.json"
        sidecar.parent.mkdir(exist_ok=True)
        tmp = sidecar.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, sort_keys=True))
        os.replace(tmp, sidecar)
        records.append(entry)
    return job.index, time.perf_counter() - start, records
