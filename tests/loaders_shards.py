"""Small materializations shared by the loader tests (built once per test session, in a temp folder).

Shard sizes deliberately do not divide the sample counts, so every partition has a ragged end.
"""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.sources.synth import labelled_images

PNG_SAMPLES, PNG_SHARD = 230, 37      # 6 shards of 37 + one of 8
NPY_SAMPLES, NPY_SHARD = 100, 29      # 3 shards of 29 + one of 13


def _source(per_class: int, seed: int) -> ArraySource:
    images, labels = labelled_images(per_class, seed=seed)
    info = {"kind": "test", "path": "memory", "fingerprint": f"synth-{per_class}-{seed}", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(len(labels))], tuple("abcdefghij"), info)


@functools.lru_cache(maxsize=None)
def built_root() -> Path:
    """``<root>/cifar10/train/{full,rank-005,high-002,factors-006,spectra}`` (png, shuffled) and
    ``<root>/cifar10/test/{full,rank-003}`` (npy, source order)."""
    root = Path(tempfile.mkdtemp(prefix="rankshard-loaders-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    materialize_split(_source(PNG_SAMPLES // 10, 0), ShardSpec(
        "cifar10", "train", ranks=(5,), high=(2,), factors=6, shard_size=PNG_SHARD, workers=0, backend="torch"),
        root, show_progress=False)
    materialize_split(_source(NPY_SAMPLES // 10, 1), ShardSpec(
        "cifar10", "test", ranks=(3,), encoding="npy", shuffle=False, spectra=False, shard_size=NPY_SHARD,
        workers=0, backend="torch"), root, show_progress=False)
    return root


def copy_variant(dest: Path, split: str = "train", variant: str = "rank-005") -> Path:
    """A private copy of one variant folder (for tests that damage shards)."""
    folder = dest / variant
    shutil.copytree(built_root() / "cifar10" / split / variant, folder)
    return folder
