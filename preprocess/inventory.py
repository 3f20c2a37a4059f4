"""``rankshard-preprocess ls ROOT``: what a shards folder holds, and whether each split is complete.

ROOT is a folder, object storage (``s3://``, other fsspec protocols), or over HTTP a split or variant folder;
``format/tree.py`` reads them all the same way, and a variant folder names the split above it. A split is
found by its ``.rankshard-config.json`` (written before the first shard), or in a copy made without hidden
files by its variants' manifests. It is *complete* when every variant has its ``manifest.json`` (written
last); otherwise the per-shard records in ``.progress/`` say how far it got.

Whether a run is writing it *now* is known only in a local folder, from the run lock (``lock_visible``):
``writing`` while a run holds it, else ``stopped`` (rerunning the same command resumes). Object storage keeps
no lock (``objectstore.py``: ranks on nodes that share no filesystem share no flock); all that shows there
of a run in flight is the temporary key of an upload (``.NAME.<pid>-<id>.partial``), which an upload cut off
leaves too (``partial_files``). So an unfinished remote split is ``stopped`` as far as anyone can see. HTTP
cannot list: a variant without its manifest there has shards and bytes that cannot be counted (None).
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.format.transport import basename, is_url, join, scheme
from rankshard.preprocess.format.tree import (CONFIG_NAME, MANIFEST, NamedSplit, can_list, files_below,
                                              folders_holding, is_ours, named_split, split_tree, within)
from rankshard.preprocess.locking import lock_holder
from rankshard.preprocess.progress import human_bytes


@dataclass
class SplitInfo:
    """One split below ROOT: its configuration, and per variant what is there."""

    path: str                           # dataset/split, relative to ROOT
    status: str                         # "complete", "writing" (a run holds the lock), "stopped", "unreadable"
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    backend: str = "?"
    shards_done: int | None = 0         # shards whose every variant is written; None: cannot be counted (HTTP)
    shards_planned: int | None = None   # None: not recorded (made before the plan was, or no config file)
    images: int | None = None           # samples (complete) or inputs planned (not complete)
    bytes: int | None = 0               # of every tar present; None: cannot be counted (HTTP)
    variants: dict[str, dict] = field(default_factory=dict)  # name -> {"shards", "bytes", "manifest"}
    writer: str | None = None           # the run holding the lock, if any
    skipped_inputs: int = 0             # unreadable inputs recorded in the manifest (complete splits)
    problem: str | None = None          # why an unreadable split could not be listed
    lock_visible: bool = True           # False on object storage and HTTP: no run lock there (see the module)
    partial_files: int = 0              # temporary shard files or upload keys: a write in flight, or cut off

    def to_json(self) -> dict:
        return asdict(self)


def inventory(root: str | Path) -> list[SplitInfo]:
    """Every split below ``root`` (a folder or a URL), sorted by path: found by its config file, or (a copy
    made without hidden files) by its variants' manifests. One damaged split is listed as unreadable; the
    others are listed. Over HTTP, ``root`` names one split (see the module)."""
    root = str(root)
    if not can_list(root):
        split = named_split(root)
        return [_split_or_problem(basename(split.url), lambda shown: _unlisted_split(shown, split))]
    root, files = split_tree(root)
    read = functools.lru_cache(maxsize=None)(read_json)  # a manifest is read once (remotely: one request)
    found = set(folders_holding(files, CONFIG_NAME)) | {
        posixpath.dirname(v) for v in folders_holding(files, MANIFEST) if is_ours(read, join(root, v, MANIFEST))}
    lock = None if is_url(root) else lock_holder
    return [_split_or_problem(rel or basename(root if is_url(root) else os.path.abspath(root)),
                              lambda shown, rel=rel: _listed_split(shown, join(root, rel), within(files, rel),
                                                                   read, lock))
            for rel in sorted(found, key=lambda r: r.split("/"))]


def _split_or_problem(shown: str, info) -> SplitInfo:
    try:
        return info(shown)
    except (RankshardError, OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
        return SplitInfo(shown, "unreadable", problem=f"{type(exc).__name__}: {exc}")


def _listed_split(shown: str, split: str, files: dict[str, int], read, lock) -> SplitInfo:
    """A split whose files are listed (``files``: below ``split``); ``lock``: the run-lock probe, None where
    runs keep none."""
    names = sorted({f.split("/", 1)[0] for f in files if "/" in f and not f.startswith(".")})
    variants = {n: _variant_info(join(split, n), within(files, n), read) for n in names}
    variants = {n: v for n, v in variants.items() if v["manifest"] or v["shards"] or v["records"]}
    recorded = read(join(split, CONFIG_NAME)) if CONFIG_NAME in files else None
    probe = (lambda: lock(Path(split))) if lock else None
    return _summary(shown, variants, recorded, probe)


def _unlisted_split(shown: str, split: NamedSplit) -> SplitInfo:
    """A split over HTTP: the variants its configuration makes, each complete (its manifest is there) or not
    countable (nothing can be listed)."""
    variants = {}
    for name, manifest in split.manifests().items():
        shards = manifest["shards"] if manifest else None
        variants[name] = {"shards": len(shards) if manifest else None, "manifest": manifest is not None,
                          "bytes": sum(s["bytes"] for s in shards) if manifest else None,
                          "manifest_data": manifest, "partial": 0}
    return _summary(shown, variants, split.recorded, None)


def _summary(shown: str, variants: dict[str, dict], recorded: dict | None, probe_lock) -> SplitInfo:
    """The split's line from its variants (``_variant_info``'s dicts) and recorded configuration (its config
    file; a manifest carries the same entries); ``probe_lock()``: the run writing it, None where not visible."""
    first = next((v["manifest_data"] for v in variants.values() if v["manifest_data"]), None)
    recorded = recorded or first
    complete = bool(variants) and all(v["manifest"] for v in variants.values())
    writer = None if complete or probe_lock is None else probe_lock()
    plan = recorded.get("plan") or {}
    counts, sizes = [v["shards"] for v in variants.values()], [v["bytes"] for v in variants.values()]
    return SplitInfo(
        path=shown, status="complete" if complete else ("writing" if writer else "stopped"),
        config=dict(recorded["config"]), config_hash=str(recorded["config_hash"]),
        backend=(recorded.get("svd") or {}).get("backend", recorded["config"].get("backend", "?")),
        shards_done=None if None in counts else min(counts, default=0),
        shards_planned=len(first["shards"]) if complete else plan.get("shards"),
        images=first["num_samples"] if complete else plan.get("inputs"),
        bytes=None if None in sizes else sum(sizes),
        variants={n: {k: v[k] for k in ("shards", "bytes", "manifest")} for n, v in variants.items()},
        writer=writer, skipped_inputs=len(first.get("errors", ())) if complete else 0,
        lock_visible=probe_lock is not None, partial_files=sum(v["partial"] for v in variants.values()))


def _variant_info(folder: str, files: dict[str, int], read) -> dict:
    """Shards and bytes of one variant (``files``: below it): a complete one by its manifest, an unfinished one
    by the shards that have their record (written after the shard: a shard without one may be overwritten on
    resume)."""
    data = read(join(folder, MANIFEST)) if MANIFEST in files else None
    shards = len(data["shards"]) if data else len(_with_record(files))
    return {"shards": shards, "bytes": sum(n for f, n in files.items() if _is_shard(f)),
            "manifest": data is not None, "manifest_data": data,
            "records": sum(f.startswith(".progress/") and f.endswith(".tar.json") for f in files),
            "partial": sum(f.startswith(".") and f.endswith(".partial") and "/" not in f for f in files)}


def _is_shard(name: str) -> bool:
    return name.endswith(".tar") and "/" not in name


def _with_record(files: dict[str, int]) -> dict[str, int]:
    """Name -> bytes of the shards in ``files`` (a variant folder's) that have their record."""
    return {f: n for f, n in files.items() if _is_shard(f) and f".progress/{f}.json" in files}


def finished_shards(folder: Path) -> dict[str, int]:
    """Name -> bytes of the variant's shards that have their record (written after the shard is renamed
    into place): what a resumed run keeps. A shard without one may be written again."""
    return _with_record(files_below(folder))


def print_inventory(root: str | Path, splits: list[SplitInfo]) -> None:
    """A line per split (status, size, configuration), then a line per variant."""
    if not splits:
        print(f"{root}: no rankshard splits below it (none has {CONFIG_NAME})")
        return
    print(root)
    for s in splits:
        if s.status == "unreadable":
            print(f"  {s.path}  unreadable: {s.problem}")
            continue
        c = s.config
        what = [c.get("encoding", "png")] + [f"{k} {','.join(map(str, c[k]))}" for k in ("ranks", "high", "lowpass",
                                                                                           "highpass") if c.get(k)]
        what += [f"factors {c['factors']}"] if c.get("factors") else []
        size = human_bytes(s.bytes) if s.bytes is not None else "size unknown"
        print(f"  {s.path}  {_state(s, scheme(root))}  {size}  [{'; '.join(what)}; backend {s.backend}; "
              f"config {s.config_hash}]")
        for name, v in s.variants.items():
            shards = _count(v["shards"], "shard") if v["shards"] is not None else "? shards"
            size = human_bytes(v["bytes"]) if v["bytes"] is not None else "?"
            print(f"    {name:<14} {shards:>12}  {size:>9}" + ("" if v["manifest"] else "  (no manifest yet)"))


def _state(s: SplitInfo, where: str) -> str:
    """What the split's line says of its state: only what can be seen where it lies (see the module)."""
    if s.status == "complete":
        state = f"complete: {_count(s.images, 'image')} in {_count(s.shards_done, 'shard')}"
        return state + (f" ({_count(s.skipped_inputs, 'unreadable input')} skipped)" if s.skipped_inputs else "")
    if s.shards_done is None:
        complete = sum(v["manifest"] for v in s.variants.values())
        return (f"{s.status}: {complete} of {len(s.variants)} variants complete; {where}:// cannot list, so the "
                "shards done cannot be counted: run ls where the shards are written")
    planned = f" of {s.shards_planned}" if s.shards_planned is not None else ""
    if s.writer:
        return f"{s.status}: {s.shards_done}{planned} shards done (run {s.writer} holds it)"
    state = f"{s.status}: {s.shards_done}{planned} shards done; rerun the same command to resume"
    if s.lock_visible:
        return state
    state += f" ({where}:// keeps no run lock: a run elsewhere may still be writing it"
    if s.partial_files:
        state += f"; {_count(s.partial_files, 'unfinished upload')} there, in flight or cut off"
    return state + ")"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def inventory_json(splits: list[SplitInfo]) -> str:
    return json.dumps([s.to_json() for s in splits], indent=2, sort_keys=True)
