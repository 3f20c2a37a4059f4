"""``rankshard-evaluate rig``'s work: maps for every checkpoint, .npy files, figures, checks, a JSON summary.

Output folder layout::

    OUT/rig.json                the result (kind "rig", ``evaluate.results``): config, inputs, per checkpoint:
                                classes explained, files, rank-path deltas
    OUT/images.npy              the explained images [N, 3, H, W] float32
    OUT/<ckpt>/<method>.npy     reduced maps [N, H, W] float32 (method: vanilla, rig, ig, smoothgrad, rank-path)
    OUT/<ckpt>/maps.png         one row per image: original, one column per method (paper Fig. 1)
    OUT/compare.png             all checkpoints side by side (paper Fig. 11), when there are several
    OUT/<ckpt>/check.json       with --check: randomization test and rank-path convergence deltas
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rankshard.preprocess.rank.engine import Decomposition, RankEngine
from rankshard.preprocess.devices import resolve_device
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.progress import Progress

from rankshard.evaluate.rig.attribution import SIGNED_REDUCTIONS
from rankshard.evaluate.checkpoints import LoadedCheckpoint
from rankshard.evaluate.rig.check import randomization_table, randomized_models
from rankshard.evaluate.rig.figures import Column, save_rows_figure
from rankshard.evaluate.rig.inputs import InputBatch
from rankshard.evaluate.rig.maps import RANK_METHODS, TITLES, MapConfig, MapSet, compute_maps
from rankshard.evaluate.options import rank_engine
from rankshard.evaluate.results import write_result


@dataclass(frozen=True)
class RunConfig:
    """Everything ``run_rig`` needs besides the checkpoints and images; dumped into ``rig.json``."""

    maps: MapConfig
    out: Path
    clip: float = 99.0              # colour scale ends at this percentile of |map|
    device: str = "auto"            # auto: CUDA when present
    svd_backend: str = "auto"
    trust: bool = False             # allow full unpickling of checkpoints (only for files you trust)
    check: bool = False
    randomization: str = "cascade"  # cascade (top layer first, cumulative) | all
    seed: int = 0
    quiet: bool = False             # no progress bar

    def __post_init__(self) -> None:
        if not 0 < self.clip <= 100:
            raise RankshardError(f"--clip {self.clip}: a percentile in (0, 100], e.g. 99")


def check_input_size(loaded: list[LoadedCheckpoint], images: np.ndarray) -> None:
    """Refuse images whose size differs from a checkpoint's declared ``input_size`` (naming both)."""
    h, w = images.shape[-2:]
    for ck in loaded:
        size = ck.input_size
        if size is not None and (h, w) != (size, size):
            raise RankshardError(f"{ck.path}: trained on {size}x{size} inputs but the images are {h}x{w}; use "
                                 "shards of that resolution, or --images FILE... (resized to the input size)")


def _save_maps(folder: Path, maps: MapSet) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for method, arr in maps.maps.items():
        np.save(folder / f"{method}.npy", arr.astype(np.float32))
        files[method] = str(folder / f"{method}.npy")
    return files


def _columns(maps: MapSet, cfg: MapConfig, prefix: str = "") -> list[Column]:
    signed = cfg.rig.reduction in SIGNED_REDUCTIONS
    return [Column(prefix + TITLES[m], maps.maps[m], signed) for m in cfg.methods]


def _row_labels(batch: InputBatch, *targets: list[int]) -> list[str]:
    """``KEY\nlabel L, class T`` per image; with several checkpoints' targets (compare.png) each one's class in
    column order, ``classes 3 / 0``: every checkpoint explains its own top class."""
    rows = []
    for i, (n, l) in enumerate(zip(batch.names, batch.labels)):
        classes = [t[i] for t in targets]
        text = f"class {classes[0]}" if len(classes) == 1 else "classes " + " / ".join(map(str, classes))
        rows.append(f"{n}\nlabel {l}, {text}" if l >= 0 else f"{n}\n{text}")
    return rows


def _delta_summary(maps: MapSet) -> dict | None:
    deltas = [n["rank_path"] for n in maps.notes if "rank_path" in n]
    if not deltas:
        return None
    return {"per_image": deltas, "max_abs_delta": max(abs(d["delta"]) for d in deltas),
            "max_relative_delta": max(d["relative_delta"] for d in deltas)}


def run_check(ck: LoadedCheckpoint, images: torch.Tensor, decs: Decomposition | None, cfg: RunConfig, engine: RankEngine,
              maps: MapSet) -> dict:
    """Randomization test for ``ck`` (same classes as ``maps``) and the rank-path convergence delta."""
    stages = []
    for stage, rand in randomized_models(ck.model, cfg.randomization, cfg.seed):
        stages.append((stage, compute_maps(rand, images, cfg.maps, engine, maps.targets, decs).maps))
    path = maps if "rank-path" in cfg.maps.methods else compute_maps(
        ck.model, images, dataclasses.replace(cfg.maps, methods=("rank-path",)), engine, maps.targets, decs)
    return {"checkpoint": ck.path, "randomization": cfg.randomization,
            "spearman": randomization_table(maps.maps, stages), "rank_path": _delta_summary(path)}


def _explain(ck: LoadedCheckpoint, images: torch.Tensor, decs, batch: InputBatch, cfg: RunConfig, engine: RankEngine,
             bar: Progress) -> dict:
    start = time.perf_counter()
    maps = compute_maps(ck.model, images, cfg.maps, engine, decs=decs, on_image=lambda: bar.update(1))
    seconds = time.perf_counter() - start
    folder = cfg.out / ck.name
    entry = {"name": ck.name, "path": ck.path, "arch": ck.payload.get("arch"), "variant": ck.payload.get("variant"),
             "targets": maps.targets, "seconds": seconds, "images_per_s": len(images) / seconds,
             "maps": _save_maps(folder, maps), "rank_path": _delta_summary(maps)}
    entry["figure"] = str(save_rows_figure(folder / "maps.png", batch.images, _columns(maps, cfg.maps),
                                           _row_labels(batch, maps.targets), f"{ck.name}: saliency, "
                                           f"{cfg.maps.rig.output} of the full-rank top class", cfg.clip))
    if cfg.check:
        report = run_check(ck, images, decs, cfg, engine, maps)
        (folder / "check.json").write_text(json.dumps(report, indent=2) + "\n")
        entry["check"] = str(folder / "check.json")
        entry["check_result"] = report
    entry["_maps"] = maps
    return entry


def _entry_files(entry: dict) -> list[str]:
    return list(entry["maps"].values()) + ([entry["check"]] if "check" in entry else [])


def run_rig(loaded: list[LoadedCheckpoint], batch: InputBatch, cfg: RunConfig, source: dict) -> dict:
    """Explain ``batch`` with every checkpoint; write maps, figures, checks and ``rig.json``; return its body
    (figure paths as written, not relative)."""
    device = resolve_device(cfg.device)
    cfg.out.mkdir(parents=True, exist_ok=True)
    np.save(cfg.out / "images.npy", batch.images)
    engine = rank_engine(cfg.svd_backend, device)
    images = torch.from_numpy(batch.images).to(device)
    # one decomposition per image for every checkpoint and randomization stage (--check needs the rank path)
    decs = engine.decompose(images) if RANK_METHODS & set(cfg.maps.methods) or cfg.check else None
    bar = Progress(len(images) * len(loaded), "rig", enabled=not cfg.quiet)
    entries = [_explain(ck, images, decs, batch, cfg, engine, bar) for ck in loaded]
    bar.close()
    figures = [e["figure"] for e in entries]
    if len(entries) > 1:
        cols = [c for e in entries for c in _columns(e["_maps"], cfg.maps, f"{e['name']}\n")]
        figures.append(str(save_rows_figure(cfg.out / "compare.png", batch.images, cols,
                                            _row_labels(batch, *(e["targets"] for e in entries)),
                                            "checkpoints side by side (each explains its own top class; classes "
                                            "in checkpoint order)", cfg.clip)))
    for e in entries:
        del e["_maps"]
    body = {"source": source, "inputs": {"names": batch.names, "labels": batch.labels,
                                         "shape": list(batch.images.shape)},
            "checkpoints": entries, "svd": engine.describe()}
    files = [cfg.out / "images.npy"] + [f for e in entries for f in _entry_files(e)]
    path = write_result(cfg.out, "rig", body, config=_jsonable(dataclasses.asdict(cfg)), device=device,
                        figures=figures, files=files)
    return {**body, "figures": figures, "path": str(path)}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return str(obj) if isinstance(obj, Path) else obj
