"""``rankshard-preprocess ls ROOT``: what a shards folder holds, and whether each split is complete.

A split is found by its ``.rankshard-config.json`` (written before the first shard). It is *complete* when
every variant has its ``manifest.json`` (written last); otherwise the per-shard records in ``.progress/``
say how far it got, and the run lock says whether a run is writing it now or it stopped (rerunning the
same command resumes it).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rankshard.preprocess.format.manifest import read_json
from rankshard.preprocess.locking import lock_holder
from rankshard.preprocess.progress import human_bytes

CONFIG_NAME = ".rankshard-config.json"


@dataclass
class SplitInfo:
    """One split below ROOT: its configuration, and per variant what is there."""

    path: str                           # dataset/split, relative to ROOT
    config: dict
    config_hash: str
    backend: str
    status: str                         # "complete", "writing" (a run holds the lock) or "stopped"
    shards_done: int                    # shards whose every variant is written
    shards_planned: int | None          # None: made before the plan was recorded
    images: int | None                  # samples (complete) or inputs planned (not complete)
    bytes: int                          # of every tar present
    variants: dict[str, dict] = field(default_factory=dict)  # name -> {"shards", "bytes", "manifest"}
    writer: str | None = None           # the run holding the lock, if any
    skipped_inputs: int = 0             # unreadable inputs recorded in the manifest (complete splits)

    def to_json(self) -> dict:
        return asdict(self)


def inventory(root: Path) -> list[SplitInfo]:
    """Every split below ``root`` (found by its config file), sorted by path."""
    root = Path(root)
    return [_split_info(root, config.parent) for config in sorted(root.rglob(CONFIG_NAME))]


def _split_info(root: Path, folder: Path) -> SplitInfo:
    recorded = read_json(folder / CONFIG_NAME)
    variants = {d.name: _variant_info(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    manifests = [v["manifest"] for v in variants.values()]
    complete = bool(variants) and all(manifests)
    done = min((v["shards"] for v in variants.values()), default=0)
    writer = None if complete else lock_holder(folder)
    plan = recorded.get("plan") or {}
    first = next(iter(variants.values()), {}).get("manifest_data") or {}
    return SplitInfo(
        path=folder.relative_to(root).as_posix(), config=recorded["config"], config_hash=recorded["config_hash"],
        backend=recorded.get("svd", {}).get("backend", recorded["config"].get("backend", "?")),
        status="complete" if complete else ("writing" if writer else "stopped"),
        shards_done=done, shards_planned=len(first.get("shards", ())) if complete else plan.get("shards"),
        images=first.get("num_samples") if complete else plan.get("inputs"),
        bytes=sum(v["bytes"] for v in variants.values()),
        variants={n: {k: v[k] for k in ("shards", "bytes", "manifest")} for n, v in variants.items()},
        writer=writer, skipped_inputs=len(first.get("errors", ())) if complete else 0)


def _variant_info(folder: Path) -> dict:
    tars = list(folder.glob("*.tar"))
    records = {p.name[: -len(".json")] for p in (folder / ".progress").glob("*.tar.json")}
    manifest = folder / "manifest.json"
    return {"shards": sum(t.name in records for t in tars), "bytes": sum(t.stat().st_size for t in tars),
            "manifest": manifest.exists(), "manifest_data": read_json(manifest) if manifest.exists() else None}


def print_inventory(root: Path, splits: list[SplitInfo]) -> None:
    """A line per split (status, size, configuration), then a line per variant."""
    if not splits:
        print(f"{root}: no rankshard splits below it (none has {CONFIG_NAME})")
        return
    print(root)
    for s in splits:
        c = s.config
        what = [c.get("encoding", "png")] + [f"{k} {','.join(map(str, c[k]))}" for k in ("ranks", "high", "lowpass",
                                                                                           "highpass") if c.get(k)]
        what += [f"factors {c['factors']}"] if c.get("factors") else []
        if s.status == "complete":
            state = f"complete: {s.images:,} images in {s.shards_done} shards"
            state += f" ({s.skipped_inputs} unreadable inputs skipped)" if s.skipped_inputs else ""
        else:
            planned = f" of {s.shards_planned}" if s.shards_planned is not None else ""
            state = f"{s.status}: {s.shards_done}{planned} shards done"
            state += (f" (run {s.writer} holds it)" if s.writer else "; rerun the same command to resume")
        print(f"  {s.path}  {state}  {human_bytes(s.bytes)}  [{'; '.join(what)}; backend {s.backend}; "
              f"config {s.config_hash}]")
        for name, v in s.variants.items():
            print(f"    {name:<14} {v['shards']:>6} shards  {human_bytes(v['bytes']):>9}"
                  + ("" if v["manifest"] else "  (no manifest yet)"))


def inventory_json(splits: list[SplitInfo]) -> str:
    return json.dumps([s.to_json() for s in splits], indent=2, sort_keys=True)
