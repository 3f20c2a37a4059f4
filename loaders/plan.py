"""Which samples make up batch ``j`` of rank ``r`` in an epoch: pure functions of the shard sizes and seeds.

Every decision is made from the manifest's per-shard sample counts before any byte is read, so that
  * all ranks agree on the number of steps (no DDP hang, no silently short epoch),
  * a batch's content does not depend on the number of workers, and
  * resuming at ``start_step`` reproduces the remaining batches exactly without reading the skipped ones.

Training epoch (``TrainPlan``): the shards are concatenated in a seeded per-epoch order into one stream of
N samples. Each of the W ranks takes a contiguous run of Q = steps * B stream positions (rank r:
[r*Q, (r+1)*Q)), where steps = floor(N / (W*B)) with drop_last (the N - W*Q tail of this epoch's stream
is not seen this epoch; a different tail each epoch, since the shard order changes) or ceil(N / (W*B))
without it (the stream wraps around: the first W*Q - N samples are seen twice). A rank's run is cut into
blocks of S samples (the shuffle buffer, rounded up to a multiple of B), each block permuted with a
seeded generator, and batch j is the j-th group of B in that permuted order.

Evaluation (``EvalPlan``): the stream is the shards in manifest order, cut into W contiguous parts of
floor or ceil(N / W) samples; every rank runs ceil(ceil(N / W) / B) steps, and a rank's last batches
may be short or empty so that the step count stays equal. Every sample appears exactly once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rankshard.loaders.errors import LoaderError


def rank_part(n: int, rank: int, world_size: int) -> range:
    """The stream positions of ``n`` samples that rank ``rank`` of ``world_size`` evaluates: a contiguous part
    of floor or ceil(n / world_size) samples (every sample exactly once over the ranks)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


@dataclass(frozen=True)
class Stream:
    """Shards concatenated in ``order``; a position maps to (shard index, position within that shard)."""

    sizes: tuple[int, ...]
    order: tuple[int, ...]
    ends: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "ends", np.cumsum([self.sizes[i] for i in self.order]))

    @property
    def total(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Shard indices and in-shard positions of stream ``positions`` (taken modulo the stream length)."""
        p = np.asarray(positions, dtype=np.int64) % max(self.total, 1)
        slot = np.searchsorted(self.ends, p, side="right")
        starts = self.ends - np.asarray([self.sizes[i] for i in self.order])
        return np.asarray(self.order, dtype=np.int64)[slot], p - starts[slot]


def batch_seed(seed: int, epoch: int, rank: int, step: int) -> int:
    """The augmentation seed of one batch: independent streams per (seed, epoch, rank, step)."""
    return int(np.random.SeedSequence([seed, epoch, rank, step, 0xA06]).generate_state(1)[0])


def worker_batches(steps: int, start: int, worker: int, workers: int) -> list[int]:
    """Batches a DataLoader worker produces: it hands out batch start+i to worker i % workers, in order."""
    return list(range(start + worker, steps, max(workers, 1)))


@dataclass(frozen=True)
class TrainPlan:
    sizes: tuple[int, ...]
    batch_size: int
    rank: int
    world_size: int
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 5000
    drop_last: bool = True

    def __post_init__(self):
        n, wb = sum(self.sizes), self.world_size * self.batch_size
        steps = n // wb if self.drop_last else -(-n // wb)
        if n == 0:  # e.g. a materialization that skipped every input: no batch size or drop_last helps
            raise LoaderError("the variant holds no samples, so there is nothing to train on; check the "
                              "manifest's errors for why its inputs were skipped")
        if steps == 0:
            raise LoaderError(f"{n} samples cannot fill one batch of {self.batch_size} on each of "
                              f"{self.world_size} ranks; lower the batch size (rankshard-train --batch-size) or, "
                              "calling the loader yourself, pass drop_last=False")
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.sizes))
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "stream", Stream(tuple(self.sizes), tuple(int(i) for i in order)))
        block = max(self.shuffle_buffer, self.batch_size)
        object.__setattr__(self, "block", -(-block // self.batch_size) * self.batch_size)

    @property
    def quota(self) -> int:
        """Samples per rank per epoch (steps * batch_size)."""
        return self.steps * self.batch_size

    def _block_order(self, b: int) -> np.ndarray:
        length = min(self.block, self.quota - b * self.block)
        return np.random.default_rng([self.seed, self.epoch, self.rank, b]).permutation(length)

    def batch_positions(self, j: int) -> np.ndarray:
        """Stream positions of batch ``j`` (0 <= j < steps)."""
        b, offset = divmod(j * self.batch_size, self.block)
        within = self._block_order(b)[offset:offset + self.batch_size]
        return self.rank * self.quota + b * self.block + within

    def groups(self, batches: list[int]) -> list[list[int]]:
        """Batches read together: those of one shuffle block (one sorted pass over the block's samples)."""
        out: dict[int, list[int]] = {}
        for j in batches:
            out.setdefault(j * self.batch_size // self.block, []).append(j)
        return list(out.values())

    def seed_of(self, j: int) -> int:
        return batch_seed(self.seed, self.epoch, self.rank, j)


@dataclass(frozen=True)
class EvalPlan:
    sizes: tuple[int, ...]
    batch_size: int
    rank: int
    world_size: int

    def __post_init__(self):
        n, w = sum(self.sizes), self.world_size
        object.__setattr__(self, "stream", Stream(tuple(self.sizes), tuple(range(len(self.sizes)))))
        part = rank_part(n, self.rank, w)
        object.__setattr__(self, "begin", part.start)
        object.__setattr__(self, "end", part.stop)
        largest_part = -(-n // w)  # ceil(N / W)
        object.__setattr__(self, "steps", -(-largest_part // self.batch_size))

    def batch_positions(self, j: int) -> np.ndarray:
        lo = min(self.begin + j * self.batch_size, self.end)
        return np.arange(lo, min(lo + self.batch_size, self.end))

    def groups(self, batches: list[int]) -> list[list[int]]:
        return [[j] for j in batches]

    def seed_of(self, j: int) -> int:
        return batch_seed(0, 0, self.rank, j)
