"""One shard from source to files: load each chunk, decompose it, gather the shard's samples, write them.

Where the steps run depends on where the numeric chain runs, never what they compute:

- numeric chain on a GPU: the main process owns the device, so it decomposes every chunk (decoded by
  workers for file sources) and sends the finished payloads to a worker to encode and write;
- on CPU: a worker runs the whole shard (``make_shard``): decode, SVD, quantization, encoding, writing.
  Every core then does numeric work and encoding alike, and no single process caps the job (with the SVD
  in the main process, one core capped ImageNet-size work near 9 img/s whatever the core count).

Both paths call ``decompose`` and ``shard_job`` below, so the bytes written do not depend on the path
(tested: in-process, and with workers). torch's thread count did not change them either (1 vs 8 threads at
32x32 and 224x224, measured), so the main process keeps its share of the cores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from rankshard.preprocess.devices import torch_threads
from rankshard.preprocess.errors import SourceError
from rankshard.preprocess.format.variants import Variant
from rankshard.preprocess.payloads import concat_payloads, empty_payloads, variant_payloads, worker_engine
from rankshard.preprocess.sources.listing import Loaded
from rankshard.preprocess.writer import ShardJob, write_shard_job


@dataclass(frozen=True)
class ShardContext:
    """What every shard of one run shares; travels with each task to the worker."""

    variants: tuple[Variant, ...]
    dirs: dict[str, str]               # variant name -> folder
    class_names: tuple[str, ...]
    image_size: tuple[int, int]
    png_level: int
    config_hash: str
    on_error: str                      # "skip" or "raise"


@dataclass
class Chunk:
    """What the numeric stage made of one decoded chunk: kept positions, their payloads, the skipped files."""

    positions: np.ndarray
    labels: np.ndarray
    ids: list[str]
    payloads: dict[str, dict] | None
    errors: list[dict]


def decompose(engine, ctx: ShardContext, positions: np.ndarray, loaded: Loaded) -> Chunk:
    """One SVD pass over a decoded chunk and every variant's arrays (``--on-error raise`` stops here)."""
    if loaded.errors and ctx.on_error == "raise":
        e = loaded.errors[0]
        raise SourceError(f"{e['source']}: {e['reason']} (--on-error raise, or --strict, stops at the first bad "
                          "input; with --on-error skip, the default, bad inputs are skipped and listed in the "
                          "manifest's errors)")
    payloads = variant_payloads(engine, list(ctx.variants), loaded.images) if len(loaded.images) else None
    return Chunk(positions[loaded.keep], loaded.labels, loaded.ids, payloads, loaded.errors)


def shard_job(ctx: ShardContext, index: int, shard_name: str, chunks: list[Chunk]) -> ShardJob:
    """The shard's samples (in key order) and per-variant arrays, ready to encode and write."""
    positions = np.concatenate([c.positions for c in chunks])
    labels = np.concatenate([c.labels for c in chunks]).astype(np.int64)
    parts = [c.payloads for c in chunks if c.payloads is not None]
    payloads = concat_payloads(parts) if parts else empty_payloads(list(ctx.variants), ctx.image_size)
    meta = {"key": [f"{p:08d}" for p in positions], "index": positions.tolist(), "label": labels.tolist(),
            "source": [i for c in chunks for i in c.ids], "class_name": [ctx.class_names[y] for y in labels],
            "height": ctx.image_size[0], "width": ctx.image_size[1],
            "errors": [e for c in chunks for e in c.errors]}
    return ShardJob(index, shard_name, list(ctx.variants), ctx.dirs, payloads, meta, ctx.png_level,
                    ctx.config_hash, len(ctx.class_names))


@dataclass
class ShardTask:
    """Everything a worker needs to make shard ``index`` on its own: one load job per chunk."""

    index: int
    shard_name: str
    chunks: list[tuple[np.ndarray, object]]  # (output positions, picklable job whose run() gives a Loaded)
    backend: str                              # the resolved SVD backend (never "auto")
    ctx: ShardContext


@dataclass
class ShardDone:
    """A written shard and where its worker's time went."""

    index: int
    records: list[dict]
    decode: float
    numeric: float
    encode_write: float


def make_shard(task: ShardTask) -> ShardDone:
    """Worker entry point on CPU: load, decompose, encode and write one shard."""
    with torch_threads(1):
        engine = worker_engine(task.backend)
        chunks, decode, numeric = [], 0.0, 0.0
        for positions, job in task.chunks:
            t0 = time.perf_counter()
            loaded = job.run()
            t1 = time.perf_counter()
            chunks.append(decompose(engine, task.ctx, positions, loaded))
            decode, numeric = decode + t1 - t0, numeric + time.perf_counter() - t1
        index, seconds, records = write_shard_job(shard_job(task.ctx, task.index, task.shard_name, chunks))
    return ShardDone(index, records, decode, numeric, seconds)
