"""``--estimate``: how many bytes and hours a materialization will take, measured before it starts.

A one-off ImageNet run takes hours and hundreds of GB, and which ranks, encodings and factors to store is
decided before it starts. The estimate runs the real pipeline (same configuration, same backend) on one SVD
batch of images spread evenly over the output order, in one process, into a temporary folder, and scales
what it measured: bytes per image per variant (the tar's headers and padding included) and seconds per
image per stage. Nothing is written to ``--out`` but the source listing's cache, which the real run reuses.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from rankshard.preprocess.format.transport import is_url
from rankshard.preprocess.inventory import finished_shards
from rankshard.preprocess.pipeline import materialize_split, sample_order
from rankshard.preprocess.progress import human_bytes
from rankshard.preprocess.spec import Layout, ShardSpec


class _Sample:
    """The source restricted to ``indices`` (in this order): a Source for the pipeline.

    It names no ``listing``: the pipeline would look this sample's positions up in the whole split's.
    """

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices
        self.classes, self.info, self.image_size = source.classes, source.info, source.image_size
        self.class_names = getattr(source, "class_names", None)
        self.decode_in_workers = getattr(source, "decode_in_workers", False)

    def __len__(self) -> int:
        return len(self.indices)

    def load_job(self, indices: np.ndarray, positions: np.ndarray):
        return self.source.load_job(self.indices[indices], positions)


@dataclass
class Estimate:
    """What one split will take, scaled from a measured sample."""

    dataset: str
    split: str
    images: int                      # inputs in the split
    sample: int                      # inputs measured
    skipped: int                     # of the sample, unreadable inputs (skipped in the real run too)
    bytes_per_image: dict[str, float] = field(default_factory=dict)  # per variant, per input
    seconds_per_image: dict[str, float] = field(default_factory=dict)  # per stage, one process
    device: str = "cpu"
    processes: int = 1               # per rank in the real run: CPU workers + the main process; GPU: its workers
    ranks: int = 1                   # torchrun processes sharing the split (each with its own cores or GPU)
    free_bytes: int | None = None    # on the disk holding --out (None: object storage)
    written_bytes: int = 0           # shards of this split already in --out (a run to resume)

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes_per_image.values()) * self.images

    @property
    def fits(self) -> bool | None:
        """Whether what is still to write fits in the free space (None: object storage, nothing to compare)."""
        return None if self.free_bytes is None else self.total_bytes - self.written_bytes <= self.free_bytes

    @property
    def wall_seconds(self) -> float:
        """A lower bound: every process keeps the one-process rate and the stages overlap perfectly.

        CPU: each process does every stage of its shards. GPU: this process runs the numeric chain while
        the workers decode, encode and write, so the slower of the two sides sets the pace.
        """
        s, per_rank = self.seconds_per_image, self.images / self.ranks
        if self.device == "cpu":
            return per_rank * sum(s.values()) / self.processes
        return per_rank * max(s["svd"], (s["decode"] + s["encode_write"]) / self.processes)


def estimate_split(source, spec: ShardSpec, out: Path | str, ranks: int = 1) -> Estimate:
    """Materialize one SVD batch of ``source`` (evenly spaced over the output order) and scale it up.

    Timed as one CPU worker runs (one torch thread), after a few images have warmed every stage up (the
    first calls of the decomposition, the encoders and the decoders cost more than the rest).
    """
    order = sample_order(len(source), spec)
    take = min(len(order), spec.batch_size)
    picked = order[np.linspace(0, len(order) - 1, take).round().astype(int)]
    _materialize(source, picked[:WARM_UP], spec)
    result = _materialize(source, picked, spec)
    manifests, stats = result["manifests"], result["stats"]
    skipped = len(next(iter(manifests.values()))["errors"])
    seconds = {"decode": stats["read"], "svd": stats["svd"], "encode_write": stats["encode_write"]}
    return Estimate(spec.dataset, spec.split, len(order), take, skipped,
                    {name: sum(s["bytes"] for s in m["shards"]) / take for name, m in manifests.items()},
                    {k: v / take for k, v in seconds.items()}, _device_type(spec.device),
                    processes=spec.workers + 1 if _device_type(spec.device) == "cpu" else max(spec.workers, 1),
                    ranks=ranks, free_bytes=_free_bytes(out), written_bytes=_written_bytes(out, spec))


WARM_UP = 8  # images made (and not timed) before the measured batch


def _materialize(source, picked: np.ndarray, spec: ShardSpec) -> dict:
    """``picked`` as one shard and one batch, in this process, into a temporary folder."""
    one = replace(spec, shard_size=len(picked), batch_size=len(picked), workers=0, shuffle=False)
    with tempfile.TemporaryDirectory(prefix="rankshard-estimate-") as tmp:
        return materialize_split(_Sample(source, picked), one, tmp, show_progress=False, space_check=False,
                                 threads=1)


def _device_type(device: str) -> str:
    return "cpu" if str(device).startswith("cpu") else "cuda"


def _free_bytes(out: Path | str) -> int | None:
    """Free space on the disk that will hold ``out`` (its nearest existing folder); None for object storage."""
    if is_url(out):
        return None
    folder = Path(out).resolve()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _written_bytes(out: Path | str, spec: ShardSpec) -> int:
    """Bytes of this run's finished shards already in a local ``out``: its variants' shards that have their
    record (a resumed run keeps those; other variants and unrecorded shards do not count)."""
    if is_url(out):
        return 0
    layout = Layout(Path(out), spec.dataset, spec.split)
    return sum(sum(finished_shards(layout.variant_dir(v)).values()) for v in spec.variants())


def print_estimate(e: Estimate) -> None:
    """The estimate as a table per variant, the total against the free space, and the time."""
    measured = "all of them" if e.sample == e.images else f"{e.sample:,} of them, spread over the split"
    print(f"\n{e.dataset}/{e.split}: {e.images:,} images; measured on {measured}, made in one process"
          + (f" ({e.skipped} unreadable, skipped)" if e.skipped else ""))
    width = max(len(n) for n in e.bytes_per_image)
    for name, b in e.bytes_per_image.items():
        print(f"  {name:<{width}}  {human_bytes(b):>9}/image  {human_bytes(b * e.images):>9}")
    free = "object storage" if e.free_bytes is None else f"{human_bytes(e.free_bytes)} free at --out"
    if e.written_bytes:
        free = f"{human_bytes(e.written_bytes)} already written, {free}"
    fits = "  -- WILL NOT FIT" if e.fits is False else ""
    total = f"{human_bytes(e.total_bytes / e.images):>9}/image  {human_bytes(e.total_bytes):>9}"
    print(f"  {'all':<{width}}  {total}  ({free}){fits}")
    s = e.seconds_per_image
    print(f"  time per image in one process on one thread: decode {1e3 * s['decode']:.1f} ms, SVD + quantize "
          f"{1e3 * s['svd']:.1f} ms, encode + write {1e3 * s['encode_write']:.1f} ms ({e.device})")
    who = f"{e.processes} processes" if e.device == "cpu" else f"the GPU and {e.processes} encode workers"
    who += f" in each of {e.ranks} ranks" if e.ranks > 1 else ""
    print(f"  at least {_duration(e.wall_seconds)} with {who}, if each keeps this rate")


def _duration(seconds: float) -> str:
    """Rounded down: it is printed as a lower bound ("at least")."""
    if seconds < 120:
        return f"{int(seconds)} s"
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
