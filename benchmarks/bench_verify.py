"""Cost of the loaders' default shard verification (sha256 once per process) as a share of an epoch.

For CIFAR-size (32x32, the demo's size) and 224x224 PNG shards: one epoch of ``train_loader`` (decode +
augmentation, the way training reads) timed with ``open_variant(verify_shards=True)`` — the default — and
with ``verify_shards=False``, interleaved, >= 3 rounds; median and best of each and their ratio. The
per-process hash cache is cleared before every verified round, so each one pays the full hash. Files sit in
the page cache after the first round, so this is the CPU cost of hashing; on a cold network disk the first
epoch also pays one sequential read of every shard.

    python benchmarks/bench_verify.py [--quick] [--rounds 3] [--workers 1] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_result  # noqa: E402
from bench_loader import make_shards  # noqa: E402

from rankshard.loaders import LoaderConfig, open_variant, train_loader  # noqa: E402
from rankshard.loaders import variant as variant_module  # noqa: E402

# name: (side, samples, shard size, batch size, augmentation)
CASES = {
    "full": {"cifar32": (32, 10000, 1000, 128, "cifar"), "png224": (224, 1000, 100, 64, "imagenet")},
    "quick": {"cifar32": (32, 3000, 500, 128, "cifar"), "png224": (224, 256, 64, 64, "imagenet")},
}


def epoch_seconds(folder: Path, verify: bool, batch: int, augment: str, workers: int) -> float:
    variant_module._HASHED.clear()
    tic = time.perf_counter()
    info = open_variant(folder, verify_shards=verify)
    cfg = LoaderConfig(batch_size=batch, workers=workers, augment=augment, pin_memory=False, drop_last=False)
    n = sum(len(b) for b in train_loader(info, cfg, rank=0, world_size=1))
    assert n >= info.num_samples  # drop_last=False wraps round to full batches
    return time.perf_counter() - tic


def hash_rate(folder: Path) -> float:
    """GB/s of the sha256 pass alone (threads, page cache warm)."""
    info = open_variant(folder, verify_shards=False)
    size = sum(s["bytes"] for s in info.manifest["shards"])
    variant_module._HASHED.clear()
    tic = time.perf_counter()
    variant_module._verify_shards(info.folder, info.manifest["shards"], "raise")
    return size / 1e9 / (time.perf_counter() - tic)


def run_case(root: Path, name: str, case: tuple, rounds: int, workers: int) -> dict:
    side, n, shard, batch, augment = case
    folder = make_shards(root, name, side, n, shard)
    times = {True: [], False: []}
    for r in range(rounds):  # interleaved, alternating which goes first
        for verify in ((True, False) if r % 2 == 0 else (False, True)):
            times[verify].append(epoch_seconds(folder, verify, batch, augment, workers))
    gb = sum(p.stat().st_size for p in folder.glob("*.tar")) / 1e9
    on, off = times[True], times[False]
    result = {"side": side, "samples": n, "shard_gb": gb, "verify_s": on, "no_verify_s": off,
              "ratio_median": statistics.median(on) / statistics.median(off), "ratio_best": min(on) / min(off),
              "hash_gb_per_s": hash_rate(folder)}
    result["cost_s_per_gb"] = (statistics.median(on) - statistics.median(off)) / gb
    print(f"{name}: epoch {statistics.median(off):.2f} s without, {statistics.median(on):.2f} s with verification "
          f"(median of {rounds}) -> ratio {result['ratio_median']:.3f} (best {result['ratio_best']:.3f}); "
          f"sha256 {result['hash_gb_per_s']:.2f} GB/s on {gb * 1000:.0f} MB")
    return result


def cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in CASES["quick" if args.quick else "full"].items():
            results[name] = run_case(Path(tmp), name, case, args.rounds, args.workers)
    provenance = {"cpu": cpu_model(), "cores": os.cpu_count(),
                  "load": os.getloadavg(), "torch": torch.__version__, "python": platform.python_version(),
                  "workers": args.workers, "rounds": args.rounds}
    write_result({"benchmark": "verify", "provenance": provenance, "cases": results}, "verify-cpu", args.out)


if __name__ == "__main__":
    main()
