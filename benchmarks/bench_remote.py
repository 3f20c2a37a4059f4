"""Remote reads: loader samples/s over a local HTTP server against the same loader on local files, and the
shard cache's effect on the second epoch.

Per case (PNG shards, CIFAR-size 32x32 and 224x224, generated here), rounds are interleaved
(local, http, http+cache epoch 1, http+cache epoch 2) so that the machine's load hits all alike; median and
best samples/s are reported with the ratio against local files. The server is the standard library's
(tests/remote_servers.py) on 127.0.0.1: this measures the transport's own cost (fetch whole shard, verify
sha256, index in memory), not a network.

    python benchmarks/bench_remote.py [--quick] [--workers 2] [--rounds 3] [--out PATH]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))

from _results import write_result  # noqa: E402
from bench_loader import make_shards  # noqa: E402
from remote_servers import http_server  # noqa: E402

from rankshard.loaders import LoaderConfig, open_variant, train_loader  # noqa: E402

# name: (side, samples, shard size, batch size, augmentation)
CASES = {
    "full": {"cifar32": (32, 10000, 1000, 128, "cifar"), "png224": (224, 1000, 100, 64, "imagenet")},
    "quick": {"cifar32": (32, 3000, 500, 128, "cifar"), "png224": (224, 256, 64, 64, "imagenet")},
}


def epoch(info, batch: int, augment: str, workers: int, cache: str | None) -> float:
    """Samples/s of one training epoch."""
    cfg = LoaderConfig(batch_size=batch, workers=workers, augment=augment, pin_memory=False, drop_last=False,
                       cache_dir=cache)
    t0 = time.perf_counter()
    n = sum(len(b) for b in train_loader(info, cfg, rank=0, world_size=1))
    return n / (time.perf_counter() - t0)


def run_case(root: Path, name: str, case: tuple, workers: int, rounds: int) -> dict:
    side, n, shard, batch, augment = case
    folder = make_shards(root, name, side, n, shard)
    rates: dict[str, list[float]] = {"local": [], "http": [], "http_cache_epoch1": [], "http_cache_epoch2": []}
    with http_server(root) as (url, _):
        local, remote = open_variant(folder), open_variant(url, name, "train", "full")
        for _ in range(rounds):
            cache = tempfile.mkdtemp(prefix="rankshard-bench-cache-")
            rates["local"].append(epoch(local, batch, augment, workers, None))
            rates["http"].append(epoch(remote, batch, augment, workers, None))
            rates["http_cache_epoch1"].append(epoch(remote, batch, augment, workers, cache))
            rates["http_cache_epoch2"].append(epoch(remote, batch, augment, workers, cache))
            shutil.rmtree(cache)
    out = {"side": side, "samples": n, "shard_size": shard, "batch": batch,
           "shard_bytes_mean": sum(s["bytes"] for s in local.manifest["shards"]) // len(local.manifest["shards"])}
    for k, v in rates.items():
        out[k] = {"median": round(statistics.median(v), 1), "best": round(max(v), 1), "all": [round(x, 1) for x in v]}
        out[k]["ratio_to_local_median"] = round(statistics.median(v) / statistics.median(rates["local"]), 3)
    return out


def provenance(workers: int, rounds: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else ""
    return {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "load_avg_start": os.getloadavg(),
            "torch": torch.__version__, "python": platform.python_version(), "workers": workers, "rounds": rounds,
            "server": "http.server.ThreadingHTTPServer on 127.0.0.1 (Range support)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/remote-cpu.json)")
    args = parser.parse_args()
    result = {"provenance": provenance(args.workers, args.rounds), "cases": {}}
    root = Path(tempfile.mkdtemp(prefix="rankshard-bench-remote-"))
    try:
        for name, case in CASES["quick" if args.quick else "full"].items():
            result["cases"][name] = run_case(root, name, case, args.workers, args.rounds)
            print(name, {k: v for k, v in result["cases"][name].items() if isinstance(v, dict)})
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["provenance"]["load_avg_end"] = os.getloadavg()
    write_result(result, "remote-cpu" + ("-quick" if args.quick else ""), args.out)


if __name__ == "__main__":
    main()
