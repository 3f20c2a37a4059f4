"""Worker memory: flat in dataset size, and measured as the worker's own (issue #13, "Throughput").

The reported worker peak once grew with the dataset (280 MB at 5k images, 444 MB at 20k) although the
workers themselves did not: it was ``RUSAGE_CHILDREN``'s ``ru_maxrss``, which for a spawned child starts from
the *parent's* peak (vfork + exec), so it followed the main process, which holds the source images.
Flatness is tested on what a worker holds between shards, not on its peak (see below).
"""
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import pytest

from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import CIFAR10_CLASSES, labelled_images
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.workers import WorkerPool

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
    reason="reads VmHWM/VmRSS from Linux /proc, and flat held memory relies on glibc's malloc_trim between tasks")

# What a worker *holds* between shards (its RSS after each shard, heap trimmed) must not grow with the number
# of shards: anything kept per shard shows up as a steady climb (keeping one variant's images of every shard,
# 3 MB each, climbed ~3 MB a shard). Measured on 2 cores (one worker, torch imported, rank 5, backend none,
# shards of 1000): held RSS settles within its first few shards and then moves by a few MB either way.
# The peak (VmHWM) is the wrong figure for this: it is a maximum over all shards, so with identical shards it
# still crept up with their number by allocator luck (340 -> 346 MB here, 390 -> 415 MB on another machine).
SETTLE = 5  # shards before the held figure is compared: imports, caches and the first allocations settle
BOUND_MB = 15  # growth allowed from around shard SETTLE to the last shards: keeping 1 MB a shard would exceed it


def test_the_pool_reports_each_workers_own_peak_not_the_parents():
    parent = np.ones(300 << 17)  # 300 MB resident here, then freed: this process's peak is now >= 300 MB
    del parent
    with WorkerPool(1) as pool:
        pool.submit(abs, -1, "a trivial task").get()
        idle = pool.peak_rss_mb
        # ~18 MB measured (it imports no torch); the parent's 300 MB peak must not show through
        assert idle is not None and idle < 100, f"an idle worker reports {idle} MB: the parent's peak leaked in"
        pool.submit(bytearray, 100 << 20, "100 MB in the worker").get()  # zero-filled: every page is written
        assert pool.peak_rss_mb >= idle + 90, "the figure must follow what the worker itself holds"


def _source(n: int) -> ArraySource:
    tile, labels = labelled_images(100)  # 1000 CIFAR-size images, repeated: what the worker gets is the same work
    reps = -(-n // len(labels))
    images, labels = np.tile(tile, (reps, 1, 1, 1))[:n], np.tile(labels, reps)[:n]
    info = {"kind": "test", "path": "memory", "fingerprint": f"tiled-{n}", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(n)], CIFAR10_CLASSES, info)


class _StartedPool(WorkerPool):
    """A pool whose workers have all started before the job begins, so the worker makes every shard (the
    main process makes shards itself only while no worker has started). It keeps the last pool opened, so
    the test can read what its worker reported."""
    last: "WorkerPool | None" = None

    def __init__(self, n: int, preload=()):
        super().__init__(n, preload)
        while not all(w.ready for w in self.workers):
            self.poll()
            time.sleep(0.01)
        _StartedPool.last = self


def test_worker_memory_is_flat_in_dataset_size(tmp_path, monkeypatch):
    import rankshard.preprocess.pipeline as pipeline

    monkeypatch.setattr(pipeline, "WorkerPool", _StartedPool)
    monkeypatch.setattr(pipeline, "process_cores", lambda: 1)  # no spare core: the main process only schedules
    n = 20_000
    # backend none: no SVD, the worker quantizes, encodes and writes the same arrays
    spec = ShardSpec("cifar10", "train", ranks=(5,), spectra=False, backend="none", workers=1, shard_size=1000)
    stats = materialize_split(_source(n), spec, tmp_path, show_progress=False)["stats"]
    assert stats["images"] == n
    (worker,) = _StartedPool.last.workers
    held = list(worker.held_mb)
    assert len(held) == n // 1000, "the worker must have made every shard and reported after each"
    # medians of three shards each side: one shard's allocator state does not decide the comparison
    after_5k, after_20k = statistics.median(held[SETTLE - 2:SETTLE + 1]), statistics.median(held[-3:])
    assert after_20k <= after_5k + BOUND_MB, (
        f"worker held {after_5k:.1f} MB after 5k images and {after_20k:.1f} MB after 20k: it keeps something "
        f"from every shard (held after each shard, MB: {[round(h) for h in held]})")
