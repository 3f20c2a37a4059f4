"""``rankshard-preprocess ls ROOT``: what a shards folder holds, and whether each split is complete.

A split is found by its ``.rankshard-config.json`` (written before the first shard). It is *complete* when
every variant has its ``manifest.json`` (written last); otherwise the per-shard records in ``.progress/``
say how far it got, and the run lock says whether a run is writing it now or it stopped (rerunning the
same command resumes it).
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.locking import lock_holder
from rankshard.preprocess.progress import human_bytes

CONFIG_NAME = ".rankshard-config.json"


@dataclass
class SplitInfo:
    """One split below ROOT: its configuration, and per variant what is there."""

    path: str                           # dataset/split, relative to ROOT
    status: str                         # "complete", "writing" (a run holds the lock), "stopped", "unreadable"
    config: dict = field(default_factory=dict)
    config_hash: str = ""
    backend: str = "?"
    shards_done: int = 0                # shards whose every variant is written
    shards_planned: int | None = None   # None: not recorded (made before the plan was, or no config file)
    images: int | None = None           # samples (complete) or inputs planned (not complete)
    bytes: int = 0                      # of every tar present
    variants: dict[str, dict] = field(default_factory=dict)  # name -> {"shards", "bytes", "manifest"}
    writer: str | None = None           # the run holding the lock, if any
    skipped_inputs: int = 0             # unreadable inputs recorded in the manifest (complete splits)
    problem: str | None = None          # why an unreadable split could not be listed

    def to_json(self) -> dict:
        return asdict(self)


def inventory(root: Path) -> list[SplitInfo]:
    """Every split below ``root``, sorted by path: found by its config file, or (a copy made without hidden
    files) by its variants' manifests. One damaged split is listed as unreadable; the others are listed."""
    root = Path(root)
    found = {p.parent for p in root.rglob(CONFIG_NAME)} | {p.parent.parent for p in root.rglob("manifest.json")
                                                          if _is_ours(p)}
    return [_split_or_problem(root, folder) for folder in sorted(found)]


def _is_ours(manifest: Path) -> bool:
    """A rankshard variant manifest (other tools name files manifest.json too)."""
    try:
        return str(json.loads(manifest.read_text()).get("format", "")).startswith("rankshard/")
    except (OSError, ValueError, AttributeError):
        return False


def _split_or_problem(root: Path, folder: Path) -> SplitInfo:
    shown = (folder.relative_to(root) if folder != root else Path(root.name)).as_posix()
    try:
        return _split_info(shown, folder)
    except (RankshardError, OSError, KeyError, TypeError, AttributeError, ValueError) as exc:
        return SplitInfo(shown, "unreadable", problem=f"{type(exc).__name__}: {exc}")


def _split_info(shown: str, folder: Path) -> SplitInfo:
    variants = {d.name: _variant_info(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    variants = {n: v for n, v in variants.items() if v["manifest"] or v["shards"] or v["records"]}
    first = next((v["manifest_data"] for v in variants.values() if v["manifest_data"]), None)
    config_file = folder / CONFIG_NAME
    recorded = read_json(config_file) if config_file.exists() else first  # a manifest carries the same entries
    complete = bool(variants) and all(v["manifest"] for v in variants.values())
    writer = None if complete else lock_holder(folder)
    plan = recorded.get("plan") or {}
    return SplitInfo(
        path=shown, status="complete" if complete else ("writing" if writer else "stopped"),
        config=dict(recorded["config"]), config_hash=str(recorded["config_hash"]),
        backend=(recorded.get("svd") or {}).get("backend", recorded["config"].get("backend", "?")),
        shards_done=min((v["shards"] for v in variants.values()), default=0),
        shards_planned=len(first["shards"]) if complete else plan.get("shards"),
        images=first["num_samples"] if complete else plan.get("inputs"),
        bytes=sum(v["bytes"] for v in variants.values()),
        variants={n: {k: v[k] for k in ("shards", "bytes", "manifest")} for n, v in variants.items()},
        writer=writer, skipped_inputs=len(first.get("errors", ())) if complete else 0)


def _variant_info(folder: Path) -> dict:
    """Shards and bytes of one variant: a complete one by its manifest, an unfinished one by the shards that
    have their record (written after the shard: a shard without one may be overwritten on resume)."""
    tars = {t.name: t.stat().st_size for t in folder.glob("*.tar")}
    manifest = folder / "manifest.json"
    data = read_json(manifest) if manifest.exists() else None
    shards = len(data["shards"]) if data else len(finished_shards(folder))
    return {"shards": shards, "bytes": sum(tars.values()), "manifest": data is not None, "manifest_data": data,
            "records": len(list((folder / ".progress").glob("*.tar.json")))}


def finished_shards(folder: Path) -> dict[str, int]:
    """Name -> bytes of the variant's shards that have their record (written after the shard is renamed
    into place): what a resumed run keeps. A shard without one may be written again."""
    out = {}
    for record in (folder / ".progress").glob("*.tar.json"):
        shard = folder / record.name[: -len(".json")]
        with contextlib.suppress(FileNotFoundError):
            out[shard.name] = shard.stat().st_size
    return out


def print_inventory(root: Path, splits: list[SplitInfo]) -> None:
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
        if s.status == "complete":
            state = f"complete: {_count(s.images, 'image')} in {_count(s.shards_done, 'shard')}"
            state += f" ({_count(s.skipped_inputs, 'unreadable input')} skipped)" if s.skipped_inputs else ""
        else:
            planned = f" of {s.shards_planned}" if s.shards_planned is not None else ""
            state = f"{s.status}: {s.shards_done}{planned} shards done"
            state += (f" (run {s.writer} holds it)" if s.writer else "; rerun the same command to resume")
        print(f"  {s.path}  {state}  {human_bytes(s.bytes)}  [{'; '.join(what)}; backend {s.backend}; "
              f"config {s.config_hash}]")
        for name, v in s.variants.items():
            print(f"    {name:<14} {_count(v['shards'], 'shard'):>12}  {human_bytes(v['bytes']):>9}"
                  + ("" if v["manifest"] else "  (no manifest yet)"))


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def inventory_json(splits: list[SplitInfo]) -> str:
    return json.dumps([s.to_json() for s in splits], indent=2, sort_keys=True)
