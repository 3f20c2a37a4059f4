"""Materialization: source images -> one SVD pass per batch -> every variant's shards + manifests.

The main process reads the source and runs the SVD in large batches (on the GPU when there is one);
worker processes encode and write the tars, so SVD and encoding overlap. Every shard is a pure function
of (source, config, shard index), which is what makes resume and multi-process runs byte-identical.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .engine import RankEngine, energy_retained
from .errors import ConfigMismatchError, RankshardError
from .locking import exclusive_lock
from .manifest import finalize_manifests, read_json, write_json
from .progress import Progress
from .shards import partial_name
from .spec import Layout, ShardSpec, config_hash
from .variants import Variant
from .writer import ShardJob, write_shard_job


class Source(Protocol):
    """What the pipeline needs from a dataset split."""

    classes: tuple[str, ...]
    info: dict        # kind, path, fingerprint, checksum_verified

    def __len__(self) -> int: ...

    def load(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """uint8 images [n, H, W, 3], int64 labels [n], source ids, in the order of ``indices``."""


@dataclass
class ArraySource:
    """A split held in memory (CIFAR-10)."""

    images: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, indices):
        return self.images[indices], self.labels[indices], [self.source_ids[i] for i in indices]


@dataclass
class RunStats:
    """Seconds spent per stage, and what was done."""

    read: float = 0.0
    svd: float = 0.0
    encode_write: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    wall: float = 0.0

    def as_dict(self) -> dict:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}
        out["images_per_s"] = round(self.images / self.wall, 1) if self.wall else None
        return out


def sample_order(n: int, spec: ShardSpec) -> np.ndarray:
    """Source indices in output order: a seeded permutation for training, source order otherwise."""
    if not spec.shuffle:
        return np.arange(n)
    return np.random.default_rng(spec.seed).permutation(n)


def _to_hwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _quantized(xk: torch.Tensor, encoding: str) -> dict:
    """Stored form of a reconstruction plus what storing it lost (SPEC: clip_fraction and leak)."""
    flat = xk.flatten(1)
    clip = ((flat < 0) | (flat > 1)).float().mean(1) if encoding == "png" else torch.zeros(len(xk))
    stored = torch.round(xk.clamp(0, 1) * 255) / 255 if encoding == "png" else xk.half().float()
    leak = (stored - xk).flatten(1).norm(dim=1) / flat.norm(dim=1).clamp_min(1e-12)
    image = (stored * 255).round().to(torch.uint8) if encoding == "png" else xk.half()
    return {"image": _to_hwc(image), "clip_fraction": clip.cpu().numpy(), "leak": leak.cpu().numpy()}


@dataclass
class _Batch:
    """One decomposed batch: the stored originals, their float version and the engine's outputs."""

    images: np.ndarray
    x: torch.Tensor
    out: object

    def energy(self, k: int) -> np.ndarray:
        return energy_retained(self.out.spectra, [k])[..., 0].cpu().numpy()

    def lossless(self, **arrays) -> dict:
        n = len(self.images)
        return {"clip_fraction": np.zeros(n), "leak": np.zeros(n), "energy": np.ones((n, self.x.shape[1])), **arrays}


def _full(v: Variant, b: _Batch) -> dict:
    if v.encoding == "png":
        return b.lossless(image=b.images)
    return {**_quantized(b.x, "npy"), "energy": b.lossless()["energy"]}


def _low(v: Variant, b: _Batch) -> dict:
    return {**_quantized(b.out.low[v.rank], v.encoding), "energy": b.energy(v.rank)}


def _high(v: Variant, b: _Batch) -> dict:
    # energy of x - x_k is the share of the squared singular values beyond k
    return {**_quantized(b.out.high[v.rank], "npy"), "energy": 1.0 - b.energy(v.rank)}


def _factors(v: Variant, b: _Batch) -> dict:
    u, s, vv = (t.half().cpu().numpy() for t in b.out.factors)
    return {**b.lossless(u=u, s=s, v=vv), "energy": b.energy(v.rank)}


def _spectra(v: Variant, b: _Batch) -> dict:
    return b.lossless(s=b.out.spectra.float().cpu().numpy())


PAYLOAD_BUILDERS = {"full": _full, "low": _low, "high": _high, "factors": _factors, "spectra": _spectra}


def variant_payloads(engine: RankEngine, variants: list[Variant], images: np.ndarray) -> dict[str, dict]:
    """Run one decomposition over ``images`` (uint8 NHWC) and build every variant's arrays."""
    x = torch.from_numpy(images).to(engine.device).permute(0, 3, 1, 2).float() / 255
    out = engine.materialize(
        x,
        low=[v.rank for v in variants if v.mode == "low"],
        high=[v.rank for v in variants if v.mode == "high"],
        factors=next((v.rank for v in variants if v.mode == "factors"), None),
        spectra=True,
    )
    batch = _Batch(images, x, out)
    return {v.name: PAYLOAD_BUILDERS[v.mode](v, batch) for v in variants}


def _concat_payloads(parts: list[dict[str, dict]]) -> dict[str, dict]:
    if len(parts) == 1:
        return parts[0]
    return {name: {k: np.concatenate([p[name][k] for p in parts]) for k in parts[0][name]} for name in parts[0]}


@dataclass
class Materializer:
    """Materializes one split: owns the engine, the layout and the worker pool for one run."""

    source: Source
    spec: ShardSpec
    out: Path
    overwrite: bool = False
    show_progress: bool = True
    stats: RunStats = field(default_factory=RunStats)

    def __post_init__(self):
        self.layout = Layout(Path(self.out), self.spec.dataset, self.spec.split)
        self.variants = self.spec.variants()
        self.order = sample_order(len(self.source), self.spec)
        self.num_shards = -(-len(self.order) // self.spec.shard_size)

    # -- setup ------------------------------------------------------------------------------------
    def _engine_and_config(self) -> tuple[RankEngine, dict, str]:
        """Resolve the SVD backend, then check the folder holds nothing made with another config."""
        recorded = read_json(self.layout.config_path) if self.layout.config_path.exists() else None
        backend = self.spec.backend
        if recorded and backend == "auto" and not self.overwrite:
            backend = recorded["config"]["backend"]  # resume with the backend that wrote the first shards
        engine = RankEngine(backend, self.spec.device)
        h, w = self.image_size = self.source.load(self.order[:1])[0].shape[1:3]
        engine.decompose(torch.zeros(1, 3, h, w, device=engine.device) + 0.5)  # resolves "auto" for this size
        self.spec = replace(self.spec, backend=engine.describe()["backend"], device=engine.device.type)
        cfg = self.spec.hashed_config(self.source.info)
        digest = config_hash(cfg)
        if recorded and recorded["config_hash"] != digest:
            if not self.overwrite:
                raise ConfigMismatchError(_mismatch_message(self.layout.split_dir, recorded["config"], cfg))
            self._clear()
        return engine, cfg, digest

    def _clear(self) -> None:
        for child in self.layout.split_dir.iterdir():
            if child.name != self.layout.lock_path.name:
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _prepare_dirs(self, cfg: dict, digest: str) -> None:
        for v in self.variants:
            d = self.layout.variant_dir(v)
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob(".*.partial"):  # left by a killed run; never a complete shard
                stale.unlink()
        write_json(self.layout.config_path, {"config": cfg, "config_hash": digest})

    def _done(self, index: int) -> bool:
        return all(self.layout.shard_path(v, index).exists() and self.layout.record_path(v, index).exists()
                   for v in self.variants)

    # -- the run ----------------------------------------------------------------------------------
    def _job(self, engine: RankEngine, index: int, digest: str) -> ShardJob:
        positions = np.arange(index * self.spec.shard_size, min((index + 1) * self.spec.shard_size, len(self.order)))
        t0 = time.perf_counter()
        images, labels, ids = self.source.load(self.order[positions])
        t1 = time.perf_counter()
        parts = [variant_payloads(engine, self.variants, images[i:i + self.spec.batch_size])
                 for i in range(0, len(images), self.spec.batch_size)]
        t2 = time.perf_counter()
        self.stats.read += t1 - t0
        self.stats.svd += t2 - t1
        meta = {"key": [f"{p:08d}" for p in positions], "index": positions.tolist(), "label": labels.tolist(),
                "source": ids, "class_name": [self.source.classes[y] for y in labels],
                "height": images.shape[1], "width": images.shape[2]}
        return ShardJob(index, self.layout.shard_name(index), self.variants,
                        {v.name: str(self.layout.variant_dir(v)) for v in self.variants},
                        _concat_payloads(parts), meta, self.spec.png_level, digest, len(self.source.classes))

    def run(self) -> dict:
        """Write every missing shard, then the manifests; returns the run summary."""
        start = time.perf_counter()
        self.layout.split_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.layout.lock_path):
            engine, cfg, digest = self._engine_and_config()
            self._prepare_dirs(cfg, digest)
            todo = [i for i in range(self.num_shards) if not self._done(i)]
            self.stats.shards_skipped = self.num_shards - len(todo)
            bar = Progress(sum(self._shard_len(i) for i in todo), f"{self.spec.dataset}/{self.spec.split}",
                           enabled=self.show_progress)
            self._write_all(engine, todo, digest, bar)
            bar.close()
            self.stats.wall = time.perf_counter() - start
            manifests = finalize_manifests(self.layout, self.variants, self.num_shards, self.source, cfg, digest,
                                           engine.describe(), self.stats.as_dict(), len(self.order),
                                           self.image_size)
        return {"layout": self.layout, "manifests": manifests, "stats": self.stats.as_dict()}

    def _shard_len(self, index: int) -> int:
        return min(self.spec.shard_size, len(self.order) - index * self.spec.shard_size)

    def _write_all(self, engine: RankEngine, todo: list[int], digest: str, bar: Progress) -> None:
        if self.spec.workers == 0:
            for index in todo:
                self._collect(write_shard_job(self._job(engine, index, digest)), bar)
            return
        # spawn, not fork: forking a process that has run torch/OpenMP threads can deadlock the child
        ctx = mp.get_context("spawn")
        with ctx.Pool(self.spec.workers) as pool:
            pending: collections.deque = collections.deque()
            for index in todo:
                pending.append(pool.apply_async(write_shard_job, (self._job(engine, index, digest),)))
                while len(pending) > self.spec.workers:  # bounded: memory stays flat
                    self._collect(pending.popleft().get(), bar)
            while pending:
                self._collect(pending.popleft().get(), bar)

    def _collect(self, result: tuple[int, float, list[dict]], bar: Progress) -> None:
        index, seconds, records = result
        self.stats.encode_write += seconds
        self.stats.shards_written += 1
        n = records[0]["num_samples"]
        self.stats.images += n
        bar.update(n)


def _mismatch_message(folder: Path, old: dict, new: dict) -> str:
    diffs = [f"  {k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return (f"{folder} already holds shards made with a different configuration:\n" + "\n".join(diffs) +
            "\nRerun with the original options to resume, choose another --out, or pass --overwrite to "
            "delete those shards and start again.")


def materialize_split(source: Source, spec: ShardSpec, out: str | Path, overwrite: bool = False,
                      show_progress: bool = True) -> dict:
    """Materialize one split of a dataset into ``out``; resumes where a previous run stopped."""
    return Materializer(source, spec, Path(out), overwrite, show_progress).run()
