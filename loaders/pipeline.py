"""Training and evaluation loaders: planned reads -> decode -> batch -> rank -> augment, in workers.

Stages, each a small function: ``read_positions`` (seek to the planned samples, error policy applied),
``collate`` (decode and stack), ``BatchTransform`` (float, optional on-the-fly rank, augmentation).
``ShardStream`` runs them inside each DataLoader worker; ``Loader`` gathers batches in the main process,
moves them to the device (running rank and augmentation there when it is a GPU), counts skipped samples
and reports them when the epoch ends.

``factors-K`` variants are stacked as stored (float16 ``u, s, v``) and reconstructed at ``factors_k`` for a
whole batch at once with ``preprocess.rank.factors.reconstruct``: in the workers, or after the transfer on
the device (``LoaderConfig.reconstruct_on``; the default does it on the GPU when ``device`` is one), or not at
all (``"none"``: batches carry ``factors`` for the training loop to reconstruct, at any k <= K).
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import signal
import warnings
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from rankshard.preprocess.devices import Placement
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.rank.engine import RankEngine
from rankshard.preprocess.rank.factors import Factors, reconstruct

from rankshard.loaders.augment import AUGMENTS, UINT8_INPUT
from rankshard.loaders.config import LoaderConfig
from rankshard.loaders.decode import decode_sample
from rankshard.preprocess.format.codec import LabelMismatch
from rankshard.loaders.errors import LoaderError, LoaderWarning, Unfetched, shard_error
from rankshard.loaders.plan import EvalPlan, Stream, TrainPlan, worker_batches
from rankshard.preprocess.format.tarindex import ShardReader
from rankshard.preprocess.format.transport import IntegrityError, ShardCache, TransportError
from rankshard.loaders.variant import VariantInfo

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """x: float32 [B, C, H, W] (in [0, 1] except high-rank data); y: int64 [B]; keys: sample keys.

    ``factors``: a factors-K batch not yet reconstructed (float16 ``u [B,C,H,k]``, ``s [B,C,k]``,
    ``v [B,C,W,k]``); ``x`` is None until ``reconstruct(*batch.factors)`` fills it. The loader does that
    itself unless ``LoaderConfig(reconstruct_on="none")`` asked for the factors.
    """

    x: torch.Tensor | None
    y: torch.Tensor
    keys: list[str]
    step: int = -1
    seed: int = 0                     # augmentation seed (the transform may run after the transfer)
    errors: tuple[str, ...] = ()      # samples skipped in this batch under on_error="skip", with reasons
    factors: Factors | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def _map(self, fn) -> "Batch":
        return replace(self, x=None if self.x is None else fn(self.x), y=fn(self.y),
                       factors=None if self.factors is None else Factors(*map(fn, self.factors)))

    def pin_memory(self) -> "Batch":  # called by DataLoader(pin_memory=True)
        return self._map(lambda t: t.pin_memory())

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


_ENGINES: dict[tuple[str, str], RankEngine] = {}


def _engine(backend: str, device: torch.device) -> RankEngine:
    """One rank engine per process and device (its 'auto' calibration runs once per image size)."""
    key = (backend, str(device))
    if key not in _ENGINES:
        _ENGINES[key] = RankEngine(backend, device)
    return _ENGINES[key]


@dataclass(frozen=True)
class BatchTransform:
    """uint8/float [B,C,H,W] at the stored size -> float32 [B,C,*size]: rank first (rank is defined at
    the stored resolution), then the augmentation, with randomness from ``seed`` only."""

    augment: str
    size: tuple[int, int]
    rank: tuple[str, int] | None = None
    svd_backend: str = "auto"

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.rank is None and self.augment in UINT8_INPUT:
            # crops, flips and resizing commute with the [0, 1] scaling: augment first, scale once after
            out = AUGMENTS[self.augment](x, self.size, g)
            return out.to(torch.float32).div_(255) if x.dtype == torch.uint8 else out.to(torch.float32).contiguous()
        x = _to_float(x)
        if self.rank is not None and len(x):
            mode, k = self.rank
            engine = _engine(self.svd_backend, x.device)
            x = (engine.low_rank if mode == "low" else engine.high_rank)(x, [k])[k]
        return AUGMENTS[self.augment](x, self.size, g).contiguous()


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """float32 on the [0, 1] scale, contiguous (uint8 PNG pixels are divided by 255)."""
    return x.to(torch.float32).div_(255) if x.dtype == torch.uint8 else x.to(torch.float32).contiguous()


def open_shard(url: str, checks: dict[str, tuple[str | None, int]], cache: ShardCache | None = None) -> ShardReader:
    """Shard ``url``: a local file is seeked in place (its sha256 was checked by ``open_variant``); a remote one
    is fetched whole and checked against ``checks[url]`` (``VariantInfo.shard_checks``: sha256, bytes) before a
    sample is read, into ``cache`` when given. Every reader of a variant opens its shards here."""
    if url not in checks:
        return ShardReader(url)
    sha256, nbytes = checks[url]
    return ShardReader(url, sha256, nbytes, cache)


def read_positions(readers: dict[int, ShardReader], urls: list[str], stream: Stream,
                   positions: np.ndarray, bad_shards: dict[str, str] | None = None,
                   open_reader=None) -> dict[int, tuple]:
    """``{position: (shard url, key, members or None, reason or None)}``, reading in stream order; samples
    of ``bad_shards`` (rejected by their sha256) come back with the shard's reason and no members.
    ``open_reader(s)`` opens shard ``s`` (default: ``ShardReader(urls[s])``, for local shards only: remote ones
    need their checks, see ``open_shard``)."""
    open_reader = open_reader or (lambda s: ShardReader(urls[s]))
    shards, within = stream.locate(positions)
    out = {}
    for p in np.argsort(np.asarray(positions) % max(stream.total, 1), kind="stable"):
        s, i, url = int(shards[p]), int(within[p]), urls[int(shards[p])]
        try:
            reader = readers.get(s) or readers.setdefault(s, open_reader(s))
        except (OSError, TransportError) as exc:  # a missing file, or a remote shard that failed its retries/checks
            reason = f"cannot be opened ({getattr(exc, 'strerror', None) or exc})"
            # the server or network failing is not the shard's fault; a local file gone or remote bytes that
            # differ from the manifest are, and rewriting the shard is the fix
            unfetched = isinstance(exc, TransportError) and not isinstance(exc, IntegrityError)
            out[int(positions[p])] = (url, None, None, Unfetched(reason) if unfetched else reason)
            continue
        if i >= len(reader.index):
            last = reader.index.keys[-1] if reader.index.keys else "none"
            out[int(positions[p])] = (url, None, None, f"sample #{i} is unreadable: the shard is "
                                      f"{reader.index.problem or 'shorter than its manifest says'} "
                                      f"(last readable key {last})")
            continue
        if bad_shards and url in bad_shards:
            out[int(positions[p])] = (url, reader.index.keys[i], None, f"shard rejected: {bad_shards[url]}")
            continue
        key, members = reader.read(i)
        out[int(positions[p])] = (url, key, members, None)
    return out


def collate(samples: list[tuple], encoding: str, k: int | None, on_error: str, stored: tuple[int, int],
            factors_out: bool = False) -> tuple[torch.Tensor | Factors, torch.Tensor, list[str], tuple[str, ...]]:
    """Decode and stack samples; a bad one raises naming shard and key, or is skipped and reported.

    Factors are stacked as stored and reconstructed at ``k`` for the whole batch in one call; with
    ``factors_out`` the stacked ``Factors`` (float16, first ``k`` components) come back instead of images.
    """
    factors = encoding == "factors"
    images, labels, keys, errors = [], [], [], []
    for url, key, members, reason in samples:
        if reason is None:
            try:
                image, label = decode_sample(members, encoding, k, unreconstructed=factors, size=stored)
            except LabelMismatch as exc:
                reason = str(exc)
            except Exception as exc:  # any decode failure (PIL, numpy, int) is a bad sample
                reason = f"does not decode ({type(exc).__name__}: {exc})"
        if reason is not None:
            if on_error == "raise":
                raise shard_error(url, key, reason)
            errors.append(f"{url}: sample {key or '?'}: {reason}")
            continue
        images.append(image)
        labels.append(label)
        keys.append(key)
    y = torch.tensor(labels, dtype=torch.int64)
    if factors:
        stacked = _stack_factors(images, k, stored)
        return (stacked if factors_out else reconstruct(*stacked)), y, keys, tuple(errors)
    if images:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    else:
        x = torch.zeros(0, 3, *stored, dtype=torch.uint8 if encoding in ("png", "raw") else torch.float32)
    return x, y, keys, tuple(errors)


def _stack_factors(samples: list[tuple[np.ndarray, ...]], k: int | None, stored: tuple[int, int]) -> Factors:
    if samples:
        return Factors(*(torch.from_numpy(np.stack(part)) for part in zip(*samples)))
    (h, w), k = stored, k or 0  # every sample of the batch skipped
    return Factors(*(torch.zeros(0, 3, *shape, dtype=torch.float16) for shape in ((h, k), (k,), (w, k))))


class ShardStream(IterableDataset):
    """The batches of one rank's epoch; each DataLoader worker produces its share of them, in order."""

    def __init__(self, info: VariantInfo, plan, cfg: LoaderConfig, transform: BatchTransform | None,
                 start_step: int = 0, factors_k: int | None = None, factors_out: bool = False):
        self.urls, self.encoding, self.stored = list(info.urls), info.encoding, tuple(info.image_size)
        self.plan, self.cfg, self.transform = plan, cfg, transform
        self.bad_shards = dict(info.bad_shards)
        self.start_step, self.factors_k, self.factors_out = start_step, factors_k, factors_out
        self.checks = dict(info.shard_checks)  # remote url -> (sha256, bytes), verified as it is fetched
        self._cache: ShardCache | None = None

    def _open(self, s: int) -> ShardReader:
        """Shard ``s``: a local file is seeked in place; a remote one is fetched whole (each worker fetches the
        shards its batches touch; with ``cache_dir`` the first fetch serves every worker and later epochs)."""
        url = self.urls[s]
        if url in self.checks and self.cfg.cache_dir is not None and self._cache is None:
            self._cache = ShardCache(self.cfg.cache_dir, self.cfg.cache_bytes)
        return open_shard(url, self.checks, self._cache)

    def __iter__(self) -> Iterator[Batch]:
        worker = get_worker_info()
        w, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        readers: dict[int, ShardReader] = {}
        try:
            for group in self.plan.groups(worker_batches(self.plan.steps, self.start_step, w, nw)):
                wanted = {j: self.plan.batch_positions(j) for j in group}
                positions = np.unique(np.concatenate(list(wanted.values())))
                raw = read_positions(readers, self.urls, self.plan.stream, positions, self.bad_shards, self._open)
                for j in group:
                    yield self._batch(j, [raw[int(p)] for p in wanted[j]])
                _close_unused(readers)
        finally:
            for r in readers.values():
                r.close()

    def _batch(self, j: int, samples: list[tuple]) -> Batch:
        x, y, keys, errors = collate(samples, self.encoding, self.factors_k, self.cfg.on_error, self.stored,
                                     self.factors_out)
        seed = self.plan.seed_of(j)
        if isinstance(x, Factors):  # reconstructed after the transfer, or by the training loop
            return Batch(None, y, keys, j, seed, errors, x)
        if self.transform is not None:
            x = self.transform(x, seed)
        return Batch(x, y, keys, j, seed, errors)


OPEN_SHARDS = 8  # shard readers kept open per worker (each holds a file handle and its header index)


def _close_unused(readers: dict[int, ShardReader]) -> None:
    """Close the least recently opened readers beyond ``OPEN_SHARDS``: handles and memory stay bounded."""
    for s in list(readers)[:-OPEN_SHARDS]:
        readers.pop(s).close()


def _identity(batch):
    return batch


def _stop_signals_handled_here() -> tuple[int, ...]:
    """The stop signals (SIGTERM, SIGUSR1) this process handles itself, e.g. the trainer's save-and-stop."""
    signums = [getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name)]
    return tuple(s for s in signums if callable(signal.getsignal(s)))


def _serve_through_stop_signals(signums: tuple[int, ...], released, _worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a stop signal the main process handles ends a worker only once the main
    process has let its workers go (``released``, set when its epoch loop ends).

    A cluster's preemption (SLURM, torchrun's agent) signals the whole process group: torch's workers died at
    once and the main process crashed before it saved. Now they keep serving until the main process has saved
    and shuts them down (or dies: torch's worker watchdog then ends them); the ``terminate()`` torch's shutdown
    sends a stuck worker comes after the release and ends it at once.
    """
    def on_stop(signum, frame):
        if released.is_set():
            os._exit(0)  # as torch's own handler does for its parent's SIGTERM

    for signum in signums:
        signal.signal(signum, on_stop)


class Loader:
    """An epoch of batches. ``len()`` is the steps per epoch (equal on every rank); after an epoch,
    ``skipped`` counts samples skipped under on_error='skip' and ``skip_reasons`` says which and why."""

    def __init__(self, stream: ShardStream, cfg: LoaderConfig, main_transform: BatchTransform | None,
                 reconstruct_here: bool = False):
        self.stream, self.cfg, self.main_transform = stream, cfg, main_transform
        self.reconstruct_here = reconstruct_here  # factors arrive stacked: reconstruct after the transfer
        self.plan, self.start_step = stream.plan, stream.start_step
        self.skipped, self.skip_reasons = 0, []

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[Batch]:
        self.skipped, self.skip_reasons = 0, []
        workers = self.cfg.workers
        handled = _stop_signals_handled_here()
        released = multiprocessing.Event() if handled and workers else None
        loader = DataLoader(self.stream, batch_size=None, collate_fn=_identity, num_workers=workers,
                            pin_memory=self.cfg.pin, prefetch_factor=self.cfg.prefetch_factor if workers else None,
                            worker_init_fn=functools.partial(_serve_through_stop_signals, handled, released)
                            if released else None)
        batches = self._batches(loader)
        try:
            for batch in batches:  # not ``yield from``: that would close (and shut the workers down) first
                yield batch
        finally:
            if released is not None:
                released.set()  # the epoch loop is over: torch's shutdown may now signal a stuck worker away
            batches.close()
        self._report()

    def _batches(self, loader: DataLoader) -> Iterator[Batch]:
        for batch in _worker_deaths_named(loader):
            if batch.errors:
                self.skipped += len(batch.errors)
                self.skip_reasons.extend(batch.errors)
            if self.cfg.device is not None:
                batch = batch.to(self.cfg.device)
            if self.reconstruct_here and batch.factors is not None:
                batch = replace(batch, x=reconstruct(*batch.factors), factors=None)  # where the factors are
            if self.main_transform is not None:
                batch = replace(batch, x=self.main_transform(batch.x, batch.seed))
            yield batch

    def _report(self) -> None:
        if self.skipped:
            message = (f"skipped {self.skipped} unreadable sample(s) this epoch (on_error='skip'); first: "
                       f"{self.skip_reasons[0]}")
            log.warning(message)
            warnings.warn(message, LoaderWarning, stacklevel=3)


def _worker_deaths_named(loader: DataLoader) -> Iterator[Batch]:
    """``loader``'s batches; a worker process that died (OOM killer, segfault, ``kill -9``) ends the epoch with a
    LoaderError saying what to change, not torch's bare RuntimeError (which the CLIs would show as a traceback)."""
    try:
        yield from loader
    except RuntimeError as exc:
        # torch's words for a death: "DataLoader worker (pid 123) is killed by signal" / "(pid(s) ...) exited
        # unexpectedly"; an exception raised inside a worker comes back as "Caught X in DataLoader worker
        # process 0" and stays what it is
        if "DataLoader worker (pid" not in str(exc):
            raise
        raise LoaderError(f"a loader worker process died ({exc}); if the system ran out of memory (the kernel log "
                          "says so), lower workers, prefetch_factor or shuffle_buffer, then rerun") from None


def distributed_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else this process's ``Placement`` (process group, torchrun env, or alone)."""
    try:
        auto = Placement.from_env()
        placement = Placement(auto.rank if rank is None else rank, auto.world if world_size is None else world_size)
    except RankshardError as exc:
        raise LoaderError(str(exc)) from None
    return placement.rank, placement.world


def _factors_k(info: VariantInfo, cfg: LoaderConfig) -> int | None:
    """The rank to reconstruct factors at (K, the stored count, by default); None for other variants."""
    if info.encoding != "factors":
        if cfg.factors_k is not None:
            raise LoaderError(f"{info.folder}: factors_k={cfg.factors_k} applies to factors-K variants only "
                              f"(this one is {info.encoding}); use rank=('low', k) for on-the-fly rank")
        return None
    if cfg.factors_k is not None and cfg.factors_k > info.rank:
        raise LoaderError(f"{info.folder}: factors_k={cfg.factors_k} exceeds the K={info.rank} factors stored; "
                          f"materialize with --factors {cfg.factors_k} or lower factors_k")
    return info.rank if cfg.factors_k is None else cfg.factors_k


def _reconstruct_where(info: VariantInfo, cfg: LoaderConfig) -> str | None:
    """Where a factors batch becomes images: ``"workers"``, ``"main"`` (after the transfer, on ``cfg.device``)
    or ``"none"`` (the training loop does it); None for variants that store images."""
    if info.encoding != "factors":
        if cfg.reconstruct_on != "auto":
            raise LoaderError(f"{info.folder}: reconstruct_on={cfg.reconstruct_on!r} applies to factors-K variants "
                              f"only (this one is {info.encoding}); leave it at 'auto'")
        return None
    if cfg.reconstruct_on == "none":
        given = [f"{name}={value!r}" for name, value, default in (("augment", cfg.augment, "none"),
                 ("rank", cfg.rank, None), ("crop_size", cfg.crop_size, None)) if value != default]
        if given:
            raise LoaderError(f"{info.folder}: reconstruct_on='none' hands out the factors as stored, so "
                              f"{', '.join(given)} cannot apply; reconstruct in the loader (reconstruct_on='auto') "
                              "or drop them")
        return "none"
    if cfg.reconstruct_on == "device" or (cfg.reconstruct_on == "auto" and cfg.on_device):
        return "main"
    return "workers"


def _build(info: VariantInfo, cfg: LoaderConfig, plan, transform: BatchTransform, start_step: int) -> Loader:
    k, where = _factors_k(info, cfg), _reconstruct_where(info, cfg)
    in_worker = not cfg.on_device and where in (None, "workers")
    stream = ShardStream(info, plan, cfg, transform if in_worker else None, start_step, k,
                         factors_out=where in ("main", "none"))
    return Loader(stream, cfg, None if in_worker or where == "none" else transform, reconstruct_here=where == "main")


def train_loader(info: VariantInfo, cfg: LoaderConfig, epoch: int = 0, rank: int | None = None,
                 world_size: int | None = None, start_step: int = 0) -> Loader:
    """One training epoch for this rank: ``len()`` steps on every rank, batches a function of
    (seed, epoch, rank, world size, batch size) only; ``start_step`` resumes mid-epoch exactly."""
    rank, world_size = distributed_rank(rank, world_size)
    plan = TrainPlan(tuple(info.shard_sizes), cfg.batch_size, rank, world_size, cfg.seed, epoch,
                     cfg.shuffle_buffer, cfg.drop_last)
    if not 0 <= start_step <= plan.steps:
        raise LoaderError(f"start_step {start_step} is outside the epoch's {plan.steps} steps")
    size = cfg.crop_size or tuple(info.image_size)
    return _build(info, cfg, plan, BatchTransform(cfg.augment, size, cfg.rank, cfg.svd_backend), start_step)


def eval_loader(info: VariantInfo, cfg: LoaderConfig, rank: int | None = None,
                world_size: int | None = None) -> Loader:
    """Every sample exactly once across ranks and workers, in manifest order, never augmented (a center
    crop when ``crop_size`` is smaller than the stored size); all ranks run the same number of steps."""
    rank, world_size = distributed_rank(rank, world_size)
    plan = EvalPlan(tuple(info.shard_sizes), cfg.batch_size, rank, world_size)
    size = cfg.crop_size or tuple(info.image_size)
    return _build(info, cfg, plan, BatchTransform("none", size, cfg.rank, cfg.svd_backend), 0)
