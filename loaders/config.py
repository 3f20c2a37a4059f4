"""``LoaderConfig``: the typed, validated settings shared by training and evaluation loaders."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from rankshard.preprocess.devices import resolve_device
from rankshard.preprocess.errors import ON_ERROR
from rankshard.loaders.augment import AUGMENTS
from rankshard.loaders.errors import LoaderError

RANK_MODES = ("low", "high")
# where a factors-K batch is reconstructed (see LoaderConfig.reconstruct_on)
RECONSTRUCT_ON = ("auto", "workers", "device", "none")


def _parse_rank(rank) -> tuple[str, int] | None:
    """``("low", 5)``, ``"low:5"``, ``"5"`` or ``5`` (low) -> ``("low", 5)``."""
    if rank is None:
        return None
    if isinstance(rank, (int, str)):
        text = str(rank)
        mode, _, k = text.rpartition(":")
        rank = (mode or "low", k)
    try:
        mode, k = rank
        k = int(k)
    except (TypeError, ValueError):
        raise LoaderError(f"rank={rank!r}: give (mode, k) such as ('low', 5), or 'high:2'") from None
    if mode not in RANK_MODES or k < 0:
        raise LoaderError(f"rank={rank!r}: mode must be one of {RANK_MODES} and k >= 0")
    return mode, k


@dataclass(frozen=True)
class LoaderConfig:
    """Settings of one loader. Sizes are in samples; ``crop_size`` None means the stored image size."""

    batch_size: int = 128               # samples per batch per rank
    workers: int = 2                    # DataLoader worker processes (0: decode in this process)
    augment: str = "none"               # "cifar" | "imagenet" | "none" (training only; eval never augments)
    crop_size: int | tuple[int, int] | None = None
    shuffle_buffer: int = 5000          # samples per shuffle block (raw bytes held per worker: buffer / workers)
    seed: int = 0
    on_error: str = "raise"             # "raise": stop naming shard+key; "skip": drop the sample, count it
    rank: tuple[str, int] | str | int | None = None  # on-the-fly rank, e.g. ("low", 5) or ("high", 2)
    factors_k: int | None = None        # factors-K variants: reconstruct at this k <= K (default K)
    reconstruct_on: str = "auto"        # factors-K: "workers" (CPU), "device" (after the transfer, on `device`),
                                        # "none" (Batch.factors, x None: call reconstruct() yourself), "auto":
                                        # "device" when `device` is a GPU, else "workers"
    pin_memory: bool | None = None      # None: pin when CUDA is available
    drop_last: bool = True              # training: floor (True) or ceil (False, wrapping) steps per epoch
    device: str | None = None           # move batches there ("auto": this rank's GPU, else the CPU); on-the-fly
                                        # rank and augmentation then run there
    svd_backend: str = "auto"           # rank engine backend for on-the-fly rank
    prefetch_factor: int = 2            # batches in flight per worker
    cache_dir: str | None = None        # remote shards: keep verified copies here, shared by workers and ranks
    cache_bytes: int = 50 << 30         # cache size limit in bytes (least recently used shards evicted)

    def __post_init__(self):
        if self.batch_size < 1 or self.workers < 0 or self.shuffle_buffer < 0 or self.prefetch_factor < 1:
            raise LoaderError("batch_size and prefetch_factor must be >= 1; workers and shuffle_buffer >= 0")
        if self.augment not in AUGMENTS:
            raise LoaderError(f"augment={self.augment!r}: choose one of {sorted(AUGMENTS)}")
        if self.on_error not in ON_ERROR:
            raise LoaderError(f"on_error={self.on_error!r}: choose 'raise' (default) or 'skip' (skip and count)")
        if self.cache_bytes < 1:
            raise LoaderError(f"cache_bytes={self.cache_bytes}: must be >= 1 (a limit in bytes)")
        if self.factors_k is not None and self.factors_k < 0:
            raise LoaderError(f"factors_k={self.factors_k}: must be >= 0")
        if self.reconstruct_on not in RECONSTRUCT_ON:
            raise LoaderError(f"reconstruct_on={self.reconstruct_on!r}: choose one of {', '.join(RECONSTRUCT_ON)}")
        object.__setattr__(self, "rank", _parse_rank(self.rank))
        if self.device is not None:  # "auto" / "cuda" -> this rank's own GPU, resolved once (preprocess.devices)
            object.__setattr__(self, "device", str(resolve_device(self.device)))
        if isinstance(self.crop_size, int):
            object.__setattr__(self, "crop_size", (self.crop_size, self.crop_size))

    @property
    def pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory

    @property
    def on_device(self) -> bool:
        """Whether rank and augmentation run after the transfer (on a GPU) rather than in the workers."""
        return self.device is not None and torch.device(self.device).type != "cpu"
