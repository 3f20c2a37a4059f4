"""Materialization: source images -> one SVD pass per batch -> every variant's shards + manifests.

Stages, each sized so memory stays flat (``preprocess.shardtask`` has the steps of one shard):

1. read + decode, per chunk of ``batch_size`` images;
2. numeric: one ``RankEngine.materialize`` per chunk, then quantization, energy and leak
   (``preprocess.payloads``);
3. encode + write, one job per shard.

On CPU, each worker process runs all three for a whole shard, a bounded number in flight: every core does
every stage. With the numeric chain on a GPU, this process owns the device and runs stage 2 while workers
decode (file sources) and encode + write.

Every shard is a pure function of (source, config, shard index): a chunk never crosses a shard boundary,
so shard ``i`` is computed identically whichever process (or ``torchrun`` rank) writes it and whatever
else runs. That is what makes resume after ``kill -9`` and multi-process runs byte-identical.

Skipped inputs (corrupt, truncated, bombs, non-images) keep that property: a sample's key is its position
in the (seeded) output order, decided before anything is decoded, and a bad file simply leaves a gap in
the keys of its shard (recorded in the shard's record and in the manifest's ``errors``).
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import multiprocessing as mp
import resource
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import torch

from rankshard.preprocess.devices import Placement, process_cores, torch_threads
from rankshard.preprocess.diskspace import SpaceCheck
from rankshard.preprocess.errors import ConfigMismatchError, RankshardError, check_on_error
from rankshard.preprocess.payloads import make_engine
from rankshard.preprocess.rank.engine import BACKENDS
from rankshard.preprocess.shardtask import ShardContext, ShardDone, ShardTask, decompose, make_shard, shard_job
from rankshard.preprocess.sources.listing import Loaded, run_job
from rankshard.preprocess.locking import RunLock
from rankshard.preprocess.format.manifest import finalize_manifests, read_json, shard_record, write_json
from rankshard.preprocess.format.transport import is_url
from rankshard.preprocess.progress import Progress
from rankshard.preprocess.spec import Layout, ShardSpec, config_hash
from rankshard.preprocess.writer import write_shard_job
from rankshard.preprocess.workers import Interrupted, WorkerPool


class Source(Protocol):
    """What the pipeline needs from a dataset split."""

    classes: tuple[str, ...]
    info: dict        # kind, path, fingerprint, checksum_verified
    image_size: tuple[int, int]

    def __len__(self) -> int: ...

    def load_job(self, indices: np.ndarray, positions: np.ndarray):
        """A picklable job whose ``run()`` returns a ``Loaded`` for source ``indices`` (output ``positions``)."""


@dataclass
class _ArrayJob:
    images: np.ndarray
    labels: np.ndarray
    ids: list[str]

    def run(self) -> Loaded:
        return Loaded(self.images, self.labels, self.ids, np.ones(len(self.labels), dtype=bool), [])


@dataclass
class ArraySource:
    """A split held in memory (CIFAR-10): loaded in this process, nothing to decode."""

    images: np.ndarray
    labels: np.ndarray
    source_ids: list[str]
    classes: tuple[str, ...]
    info: dict = field(default_factory=dict)
    decode_in_workers = False

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def load(self, indices):
        return self.images[indices], self.labels[indices], [self.source_ids[i] for i in indices]

    def load_job(self, indices: np.ndarray, positions: np.ndarray) -> _ArrayJob:
        return _ArrayJob(*self.load(indices))


@dataclass
class RunStats:
    """Seconds spent per stage, and what was done. Worker seconds are summed over workers."""

    read: float = 0.0           # this process waiting for decoded chunks (or loading them itself)
    decode: float = 0.0         # read + decode inside workers
    svd: float = 0.0            # SVD + reconstruction + quantization (summed over workers on CPU)
    encode_write: float = 0.0   # PNG/npy encoding + tar writing inside workers
    write_wait: float = 0.0     # this process blocked because the workers were behind
    shards_written: int = 0
    shards_skipped: int = 0
    images: int = 0
    skipped_files: int = 0
    wall: float = 0.0
    rank: int = 0
    world: int = 1
    worker_rss: float | None = None  # MB: the largest worker's own peak, as the workers report it

    def as_dict(self) -> dict:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items() if k != "worker_rss"}
        out["images_per_s"] = round(self.images / self.wall, 1) if self.wall else None
        out["peak_rss_mb"] = peak_rss_mb(self.worker_rss)
        return out


def peak_rss_mb(worker: float | None = None) -> dict:
    """Peak resident memory of this process and of the largest worker (None: no worker ran), in MB.

    The worker figure comes from the workers themselves (``WorkerPool.peak_rss_mb``), not from
    ``RUSAGE_CHILDREN``: a spawned child's ``ru_maxrss`` starts from its *parent's* peak (vfork + exec), so
    that figure was this process's peak at the time the workers started, and grew with the dataset held here
    rather than with anything a worker did (see ``workers.own_peak_rss_mb``).
    """
    kb = 1024  # Linux reports ru_maxrss in kilobytes
    return {"main": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / kb, 1),
            "worker": None if worker is None else round(worker, 1)}


def sample_order(n: int, spec: ShardSpec) -> np.ndarray:
    """Source indices in output order: a seeded permutation for training, source order otherwise."""
    if not spec.shuffle:
        return np.arange(n)
    return np.random.default_rng(spec.seed).permutation(n)


@contextlib.contextmanager
def _cpu_share(workers: int, cap: int | None = None):
    """Give the main process's torch the cores the worker processes leave free (at most ``cap``: ``--estimate``
    times one worker's share on one thread).

    Oversubscribed, torch's thread pool made the small per-batch tensor ops 2-3x slower (measured on 2
    cores: quantization 1.2 s -> 0.5 s per 3000 CIFAR images with one thread instead of two).
    """
    free = process_cores() - workers
    with torch_threads(free if cap is None else min(cap, free)):
        yield


@dataclass
class Materializer:
    """Materializes one split (or, under torchrun, this rank's share of it) and finalizes the manifests.

    ``rank``/``world``: this process writes the shards ``i`` with ``i % world == rank``. ``on_error``: "skip"
    (default) skips an input that cannot be decoded and records it in the manifest; "raise" stops there.
    ``space_check``: stop as soon as the shards still to write are projected not to fit on the disk
    (``preprocess.diskspace``).
    """

    source: Source
    spec: ShardSpec
    out: Path
    overwrite: bool = False
    show_progress: bool = True
    on_error: str = "skip"
    rank: int = 0
    world: int = 1
    space_check: bool = True
    threads: int | None = None  # cap on this process's torch threads (None: the cores the workers leave)
    stats: RunStats = field(default_factory=RunStats)
    keeps_shards = True  # every shard stays in ``out`` (object storage: only those in flight)

    def __post_init__(self):
        Placement(self.rank, self.world)  # validates the share (one rule with every other package)
        check_on_error(self.on_error, "--on-error")
        if self.overwrite and self.world > 1:
            raise RankshardError("--overwrite with several processes would let one rank delete another's shards; "
                                 "run once with a single process and --overwrite, or delete the folder first")
        self.layout = Layout(Path(self.out), self.spec.dataset, self.spec.split)
        self.variants = self.spec.variants()
        self.order = sample_order(len(self.source), self.spec)
        self.num_shards = -(-len(self.order) // self.spec.shard_size)
        self.stats.rank, self.stats.world = self.rank, self.world
        self.space: SpaceCheck | None = None  # set by run()
        self.recorded_svd: dict | None = None  # set when resuming an ``auto`` run (see _engine_and_config)
        self.digest: str | None = None  # the configuration's hash, set by run(): records must carry it
        self.spec.check_image_size(*self.source.image_size)  # before any folder or lock file is made

    # -- setup ------------------------------------------------------------------------------------
    can_overwrite = True  # whether --overwrite is a way out to offer (object storage refuses it)

    @property
    def where(self) -> str:
        """The split's folder as messages name it."""
        return str(self.layout.split_dir)

    def _make_engine(self, backend: str):
        engine = make_engine(backend, self.spec.device)
        if backend != "none":
            h, w = self.image_size
            engine.decompose(torch.zeros(1, 3, h, w, device=engine.device) + 0.5)  # resolves "auto" for this size
        return engine

    def _engine_and_config(self):
        """Resolve the SVD backend, then check the folder holds nothing made with another config."""
        recorded = read_json(self.layout.config_path) if self.layout.config_path.exists() else None
        if recorded is not None and not (isinstance(recorded, dict) and isinstance(recorded.get("config_hash"), str)
                                         and isinstance(recorded.get("config"), dict)
                                         and recorded["config"].get("backend") in (*BACKENDS, "none")):
            if not self.overwrite:  # the records say which shards are done: they survive the config file
                raise RankshardError(f"{self.where}: its {self.layout.config_path.name} is damaged (no config, "
                                     "config_hash or known backend); delete that file and rerun the same command, "
                                     "which keeps the shards already written")
            self._clear()
            recorded = None
        backend = self.spec.backend
        if recorded and backend == "auto" and not self.overwrite:
            backend = recorded["config"]["backend"]  # resume (or join other ranks) with the recorded backend
            # this run never calibrates, so the manifest keeps the first run's account of auto's choice
            self.recorded_svd = recorded.get("svd")
        self.image_size = tuple(self.source.image_size)
        engine = self._make_engine(backend)
        self.spec = replace(self.spec, backend=engine.describe()["backend"], device=engine.device.type)
        cfg = self.spec.hashed_config(self.source.info)
        digest = config_hash(cfg)
        if recorded and recorded["config_hash"] != digest:
            if not self.overwrite:
                raise ConfigMismatchError(_mismatch_message(self.where, recorded["config"], cfg, self.can_overwrite))
            self._clear()
        return engine, cfg, digest

    def _clear(self) -> None:
        for child in self.layout.split_dir.iterdir():
            if not child.name.startswith((".lock", ".listing")):
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def _mine(self, index: int) -> bool:
        return index % self.world == self.rank

    def _prepare_dirs(self, engine, cfg: dict, digest: str) -> None:
        for v in self.variants:
            d = self.layout.variant_dir(v)
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob(".*.partial"):  # left by a killed run; never a complete shard
                index = self.layout.partial_index(stale.name)
                if index is not None and self._mine(index):  # other ranks may be writing theirs right now
                    stale.unlink(missing_ok=True)
        plan = {"inputs": len(self.order), "shards": self.num_shards}  # for `ls`: how far an unfinished run got
        write_json(self.layout.config_path, {"config": cfg, "config_hash": digest, "svd": self._svd(engine),
                                             "plan": plan})

    def _svd(self, engine) -> dict:
        """The manifest's ``svd`` block: this engine's, or on a resumed ``auto`` run the first run's."""
        return self.recorded_svd or engine.describe()

    def _done(self, index: int) -> bool:
        """Shard ``index`` exists for every variant with a record that stands for it (``manifest.shard_record``)."""
        return all(shard_record(self.layout, v, index, self.digest, len(self.source.classes)) is not None
                   for v in self.variants)

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Write this process's missing shards, then the manifests if every shard exists; the run summary.

        ``manifests`` is None when other ranks still have shards to write: the last rank to finish
        (any rank that finds every shard done) writes them, so the call is idempotent.
        """
        start = time.perf_counter()
        _make_dir(self.layout.split_dir)
        with RunLock(self.layout.split_dir, self.rank, self.world) as lock, \
                _cpu_share(self.spec.workers, self.threads), \
                self._pool() as pool:  # opened first: the workers start up while this process sets up
            with lock.gate():  # one rank at a time resolves the backend and writes the config
                engine, cfg, digest = self._engine_and_config()
                self.digest = digest
                self._prepare_dirs(engine, cfg, digest)
            todo = [i for i in range(self.num_shards) if self._mine(i) and not self._done(i)]
            self.stats.shards_skipped = sum(self._mine(i) for i in range(self.num_shards)) - len(todo)
            desc = f"{self.spec.dataset}/{self.spec.split}" + (f" rank {self.rank}/{self.world}" if self.world > 1 else "")
            left = sum(self._shard_len(i) for i in todo)
            self.space = SpaceCheck(self.layout.split_dir, left, self.world, self.space_check and self.keeps_shards)
            bar = Progress(left, desc, enabled=self.show_progress, note=self.space.note)
            self._write_all(pool, engine, todo, digest, bar)
            self.stats.worker_rss = pool.peak_rss_mb if pool is not None else None
            bar.close()
            self.stats.wall = time.perf_counter() - start
            with lock.gate():
                manifests = self._finalize(engine, cfg, digest)
        return {"layout": self.layout, "manifests": manifests, "stats": self.stats.as_dict()}

    def _finalize(self, engine, cfg: dict, digest: str) -> dict | None:
        if not all(self._done(i) for i in range(self.num_shards)):
            return None
        return finalize_manifests(self.layout, self.variants, self.num_shards, self.source, cfg, digest,
                                  self._svd(engine), self.stats.as_dict(), self.image_size)

    def _shard_len(self, index: int) -> int:
        return min(self.spec.shard_size, len(self.order) - index * self.spec.shard_size)

    def _plan(self, todo: list[int]) -> list[tuple[int, np.ndarray]]:
        """(shard, output positions) per chunk: chunks of ``batch_size`` that never cross a shard."""
        plan = []
        for index in todo:
            lo, hi = index * self.spec.shard_size, index * self.spec.shard_size + self._shard_len(index)
            plan += [(index, np.arange(p, min(p + self.spec.batch_size, hi))) for p in range(lo, hi, self.spec.batch_size)]
        return plan

    def _decoded(self, plan, pool) -> Iterator[tuple[int, np.ndarray, Loaded]]:
        """Decoded chunks in plan order; with a pool, up to 2 chunks per worker are decoded ahead."""
        if pool is None or not getattr(self.source, "decode_in_workers", False):
            for shard, positions in plan:
                t0 = time.perf_counter()
                loaded = self._load_job(positions).run()
                self.stats.read += time.perf_counter() - t0
                self.stats.decode += loaded.seconds  # decoded here: the same seconds as the read above
                yield shard, positions, loaded
            return
        jobs = iter(plan)
        submit = lambda s, p: (s, p, pool.submit(run_job, self._load_job(p), self._decode_what(s, p)))  # noqa: E731
        pending = collections.deque(submit(s, p) for s, p in itertools.islice(jobs, 2 * self.spec.workers))
        while pending:
            shard, positions, result = pending.popleft()
            t0 = time.perf_counter()
            loaded = result.get()
            self.stats.read += time.perf_counter() - t0
            self.stats.decode += loaded.seconds
            nxt = next(jobs, None)
            if nxt is not None:
                pending.append(submit(*nxt))
            yield shard, positions, loaded

    def _decode_what(self, shard: int, positions: np.ndarray) -> str:
        first = self._source_id(positions[0])
        return (f"decoding the images at output positions {positions[0]}-{positions[-1]} of shard "
                f"{self.layout.shard_name(shard)}" + (f" (first: {first})" if first else ""))

    def _source_id(self, position: int) -> str | None:
        """The file behind an output position, for messages (file sources only)."""
        listing = getattr(self.source, "listing", None)
        return listing.ids[self.order[position]] if listing is not None else None

    def _load_job(self, positions: np.ndarray):
        return self.source.load_job(self.order[positions], positions)

    def _context(self, digest: str) -> ShardContext:
        names = getattr(self.source, "class_names", None) or self.source.classes
        return ShardContext(tuple(self.variants), {v.name: str(self.layout.variant_dir(v)) for v in self.variants},
                            tuple(names), tuple(self.image_size), self.spec.png_level, digest, self.on_error)

    @contextlib.contextmanager
    def _pool(self):
        if self.spec.workers == 0:
            yield None
            return
        # on CPU a worker runs the whole numeric chain (torch: seconds to import), else it decodes and writes
        work = "shardtask" if torch.device(self.spec.device).type == "cpu" else "writer"
        with WorkerPool(self.spec.workers, preload=(f"rankshard.preprocess.{work}",)) as pool:
            yield pool

    def _write_all(self, pool, engine, todo: list[int], digest: str, bar: Progress) -> None:
        ctx = self._context(digest)
        if pool is not None and engine.device.type == "cpu":
            self._shards_in_workers(pool, engine, todo, ctx, bar)
        else:
            self._shards_here(pool, engine, todo, ctx, bar)

    def _shards_in_workers(self, pool, engine, todo: list[int], ctx: ShardContext, bar: Progress) -> None:
        """CPU: workers make whole shards, handed out only to a worker that has started and is idle; this
        process makes shards too, in a thread, while it keeps handing them out.

        It does so whenever the pool leaves a core free (the default: cores - 1 workers, this process the
        last core's worker), and otherwise only while no worker has started yet (spawn + torch import:
        seconds) and for small shards, so a small job never waits for its workers.
        """
        backend = engine.describe()["backend"]
        small = self.spec.shard_size * self.image_size[0] * self.image_size[1] <= _MAIN_SHARD_PIXELS
        spare_core = len(pool.workers) < process_cores()
        tasks = collections.deque(todo)  # a ShardTask is built when handed out: its load jobs hold the images
        pending: list = []
        here = _ShardThread()
        try:
            while tasks or pending or here.busy:
                pool.poll()
                for done in [t for t in pending if t.done]:
                    pending.remove(done)
                    self._done_in_worker(self._wait(done), bar)
                if here.finished():
                    self._done_in_worker(here.take(), bar)
                if tasks and pool.idle_ready():
                    task = self._shard_task(tasks.popleft(), backend, ctx)
                    pending.append(pool.submit(make_shard, task, self._making_what(task)))
                elif tasks and not here.busy and (spare_core or (small and not pool.any_ready())):
                    here.start(self._shard_task(tasks.popleft(), backend, ctx))
                elif tasks or pending or here.busy:  # an answer, a started worker, a death, or our own shard
                    t0 = time.perf_counter()
                    pool.wait_any(extra=(here.wake,) if here.busy else ())
                    self.stats.write_wait += time.perf_counter() - t0
        finally:
            here.close()

    def _shard_task(self, index: int, backend: str, ctx: ShardContext) -> ShardTask:
        return ShardTask(index, self.layout.shard_name(index), [(p, self._load_job(p)) for _, p in self._plan([index])],
                         backend, ctx)

    def _making_what(self, task: ShardTask) -> str:
        first, last = task.chunks[0][0][0], task.chunks[-1][0][-1]
        source = f", first: {sid}" if (sid := self._source_id(first)) else ""
        return (f"making shard {task.shard_name} (output positions {first}-{last}{source}; decode, SVD, encode, "
                f"write: {', '.join(v.name for v in self.variants)})")

    def _done_in_worker(self, done: ShardDone, bar: Progress) -> None:
        self.stats.decode += done.decode
        self.stats.svd += done.numeric
        self._collect((done.index, done.encode_write, done.records), bar)

    def _shards_here(self, pool, engine, todo: list[int], ctx: ShardContext, bar: Progress) -> None:
        """GPU (or no workers): chunks are decomposed here; workers, if any, decode and encode + write."""
        writes: collections.deque = collections.deque()
        decoded = self._decoded(self._plan(todo), pool)
        for index, chunks in itertools.groupby(decoded, key=lambda c: c[0]):
            t0 = time.perf_counter()
            parts = [decompose(engine, ctx, p, ld) for _, p, ld in chunks]
            self.stats.svd += time.perf_counter() - t0
            job = shard_job(ctx, index, self.layout.shard_name(index), parts)
            if pool is None:
                self._collect(write_shard_job(job), bar)
                continue
            what = f"encoding and writing shard {job.shard_name} ({', '.join(v.name for v in self.variants)})"
            writes.append(pool.submit(write_shard_job, job, what))
            while len(writes) > self.spec.workers:  # bounded: memory stays flat
                self._collect(self._wait(writes.popleft()), bar)
        while writes:
            self._collect(self._wait(writes.popleft()), bar)

    def _wait(self, result):
        t0 = time.perf_counter()
        out = result.get()
        self.stats.write_wait += time.perf_counter() - t0
        return out

    def _collect(self, result: tuple[int, float, list[dict]], bar: Progress) -> None:
        index, seconds, records = result
        self.stats.encode_write += seconds
        self.stats.shards_written += 1
        n = records[0]["num_samples"]
        self.stats.images += n
        self.stats.skipped_files += len(records[0].get("errors", []))
        inputs = n + len(records[0].get("errors", []))  # skipped ones too: as frequent in what is left
        self.space.shard_done(inputs, sum(r["bytes"] for r in records))
        bar.update(inputs)


class _ShardThread:
    """One shard at a time made by this process, in a thread (numpy, torch and zlib release the GIL), so
    the scheduling loop keeps handing shards to workers meanwhile; ``wake`` becomes readable when it ends."""

    def __init__(self):
        self.wake, self._tx = mp.Pipe(duplex=False)
        self.thread: threading.Thread | None = None
        self.outcome: tuple = ()

    @property
    def busy(self) -> bool:
        return self.thread is not None

    def start(self, task: ShardTask) -> None:
        def run():
            try:
                self.outcome = (make_shard(task), None)
            except BaseException as exc:  # noqa: BLE001 - re-raised by take() in the scheduling thread
                self.outcome = (None, exc)
            finally:
                with contextlib.suppress(OSError):  # closed: the job was interrupted and did not wait
                    self._tx.send_bytes(b"")
        self.thread = threading.Thread(target=run, name="rankshard-shard", daemon=True)
        self.thread.start()

    def finished(self) -> bool:
        return self.busy and self.wake.poll()

    def take(self) -> ShardDone:
        self.wake.recv_bytes()
        self.thread.join()
        (done, error), self.thread, self.outcome = self.outcome, None, ()
        if error is not None:
            raise error
        return done

    def close(self) -> None:
        """On the way out: an error elsewhere waits for the shard in hand (it finishes or is never renamed
        into place); Ctrl-C and SIGTERM do not, the thread is a daemon and dies with the process."""
        if self.busy and not isinstance(sys.exc_info()[1], (KeyboardInterrupt, Interrupted)):
            self.thread.join()
        self.wake.close()
        self._tx.close()


# A shard this small (a CIFAR shard of 1000 is 1M pixels: about a second) is done by the main process while
# no worker has started yet: sooner than a worker takes to start, so the job never waits for them.
_MAIN_SHARD_PIXELS = 4 * 1024 * 1024


def _make_dir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RankshardError(f"{folder}: cannot create the output folder ({exc.strerror}); choose another --out "
                             "or fix its permissions") from exc


def _mismatch_message(folder: str | Path, old: dict, new: dict, can_overwrite: bool = True) -> str:
    diffs = [f"  {k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    way_out = ("pass --overwrite to delete those shards and start again" if can_overwrite else
               "delete that prefix to start again")
    return (f"{folder} already holds shards made with a different configuration:\n" + "\n".join(diffs) +
            f"\nRerun with the original options to resume, choose another --out, or {way_out}.")


def materialize_split(source: Source, spec: ShardSpec, out: str | Path, overwrite: bool = False,
                      show_progress: bool = True, on_error: str = "skip", rank: int = 0, world: int = 1,
                      space_check: bool = True, threads: int | None = None) -> dict:
    """Materialize one split of a dataset into ``out``; resumes where a previous run stopped. ``out`` may be
    an object-storage URL such as ``s3://bucket/prefix`` (see ``preprocess.objectstore``), where shards leave
    the local staging folder as they are uploaded and ``space_check`` has nothing to check."""
    if is_url(out):
        from rankshard.preprocess.objectstore import materialize_to_store
        return materialize_to_store(source, spec, str(out), overwrite, show_progress, on_error, rank, world)
    return Materializer(source, spec, Path(out), overwrite, show_progress, on_error, rank, world, space_check,
                        threads).run()
