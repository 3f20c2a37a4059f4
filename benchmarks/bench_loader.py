"""Loader throughput: decoded, augmented samples/s of ``loaders.train_loader`` against two baselines.

Baselines, measured in the same run on the same shards:
  (a) the recipe from webdataset's documentation: ``WebDataset`` -> ``.shuffle`` -> ``.decode("torchrgb")``
      -> per-sample augmentation (the same crop/flip math, one image at a time) -> ``DataLoader`` batching;
  (b) a raw sequential read of the tar members (bytes only, one process): the I/O ceiling.
Shards (PNG, CIFAR-size 32x32 and 224x224) are generated here with ``preprocess`` from synthetic
natural-looking images. Epochs are interleaved and the best of the rounds kept (shared, noisy machines).

    python benchmarks/bench_loader.py [--quick] [--workers 2] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _results import write_result  # noqa: E402  (benchmarks/ is the script's folder)

import webdataset as wds  # noqa: E402

from rankshard.loaders import LoaderConfig, open_variant, train_loader  # noqa: E402
from rankshard.loaders.augment import cifar, imagenet  # noqa: E402
from rankshard.preprocess.pipeline import ArraySource, materialize_split  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402
from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402

# name: (side, samples, shard size, batch size, augmentation) -- full run, then --quick
CASES = {
    "full": {"cifar32": (32, 10000, 1000, 128, "cifar"), "png224": (224, 1000, 100, 64, "imagenet")},
    "quick": {"cifar32": (32, 3000, 500, 128, "cifar"), "png224": (224, 256, 64, 64, "imagenet")},
}
PER_SAMPLE = {"cifar": cifar, "imagenet": imagenet}


def make_shards(root: Path, name: str, side: int, n: int, shard_size: int) -> Path:
    images, labels = labelled_images(-(-n // 10), size=(side, side), seed=0)
    info = {"kind": "bench", "path": "memory", "fingerprint": f"bench-{name}-{n}", "checksum_verified": False}
    source = ArraySource(images[:n], labels[:n], [str(i) for i in range(n)], tuple("abcdefghij"), info)
    spec = ShardSpec(name, "train", ranks=(), spectra=False, shard_size=shard_size, workers=0, backend="torch")
    materialize_split(source, spec, root, show_progress=False)
    return root / name / "train" / "full"


def run_ours(folder: Path, batch: int, augment: str, workers: int) -> int:
    cfg = LoaderConfig(batch_size=batch, workers=workers, augment=augment, pin_memory=False, drop_last=False)
    return sum(len(b) for b in train_loader(open_variant(folder), cfg, rank=0, world_size=1))


class _PerSample:
    """The docs recipe's per-sample transform (picklable for DataLoader workers)."""

    def __init__(self, augment: str, size: int):
        self.fn, self.size, self.g = PER_SAMPLE[augment], (size, size), torch.Generator().manual_seed(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x[None], self.size, self.g)[0]


def run_docs_recipe(folder: Path, batch: int, augment: str, workers: int, side: int) -> int:
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, empty_check=False)
          .shuffle(1000).decode("torchrgb").to_tuple("png", "cls").map_tuple(_PerSample(augment, side), int))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    return sum(len(y) for _, y in loader)


def run_raw(folder: Path) -> int:
    """Bytes only: every member of every shard read sequentially; counts samples (png members)."""
    n = 0
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                tar.extractfile(member).read()
                n += member.name.endswith(".png")
    return n


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def bench_case(root: Path, name: str, case: tuple, workers: int, rounds: int) -> dict:
    side, n, shard_size, batch, augment = case
    folder = make_shards(root, name, side, n, shard_size)
    runs = {"rankshard": lambda: run_ours(folder, batch, augment, workers),
            "webdataset_docs": lambda: run_docs_recipe(folder, batch, augment, workers, side),
            "raw_tar_read": lambda: run_raw(folder)}
    rate = {k: 0.0 for k in runs}
    for _ in range(rounds):  # interleaved, best kept
        for k, fn in runs.items():
            seconds, count = timed(fn)
            # ours rounds the epoch up to whole batches (drop_last=False wraps), the others stop at n
            assert n <= count < n + batch, f"{k} delivered {count} samples from {n}"
            rate[k] = max(rate[k], round(count / seconds, 1))
    result = {"side": side, "samples": n, "shard_size": shard_size, "batch_size": batch, "augment": augment,
              "workers": workers, "samples_per_s": rate,
              "speedup_vs_webdataset_docs": round(rate["rankshard"] / rate["webdataset_docs"], 2),
              "share_of_raw_tar_read": round(rate["rankshard"] / rate["raw_tar_read"], 3),
              "shard_bytes": sum(p.stat().st_size for p in folder.glob("*.tar"))}
    print(f"{name}: {json.dumps(result)}")
    return result


def provenance(workers: int, rounds: int) -> dict:
    return {"device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "numpy": np.__version__, "webdataset": wds.__version__,
            "python": platform.python_version(), "workers": workers, "rounds": rounds,
            "note": "shared machine: other jobs were running; ratios are the meaningful figures"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shards, one round")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/loader-cpu.json)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    result = {"provenance": provenance(args.workers, rounds), "cases": {}}
    print(json.dumps(result["provenance"]))
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        for name, case in CASES["quick" if args.quick else "full"].items():
            result["cases"][name] = bench_case(Path(tmp), name, case, args.workers, rounds)
    write_result(result, "loader-cpu", args.out)
    return result


if __name__ == "__main__":
    main()
