"""Fixed start-up cost: what a small job pays before and besides its images (issue #13, "small jobs").

Each figure is the wall time of a fresh process, since that is what a user's command pays (in-process
benchmarks import torch once and calibrate once, and so hide this):

- ``import_torch``: ``python -c "import torch"``, the floor of any torch-based tool (the baseline);
- ``cli_help``: ``rankshard-preprocess --help`` (the CLI's own import; it used to import torch);
- ``cifar_tiny``: ``rankshard-preprocess cifar10 --split test`` on a 100-image archive (default workers),
  so images cost next to nothing and what is left is start-up, calibration, pool, lock, manifests;
- ``cifar_tiny_in_process``: the same with ``--workers 0``;
- ``worker_shardtask`` / ``worker_writer``: a fresh process that imports the CLI (as the console script
  does: a spawned worker re-imports it) and opens a one-worker pool preloading what a CPU worker (decode +
  SVD + write: torch) or a GPU-path worker (decode + write: no torch) imports; recorded besides the whole
  process's time: the seconds from opening the pool to the worker's "ready", and the worker's resident
  memory then.

Rounds are interleaved; median and best kept; load and CPU model recorded.

    python benchmarks/bench_startup.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from benchmarks._results import cpu_model, interleaved, write_result  # noqa: E402
from rankshard.preprocess.sources.cifar import write_cifar10_archive  # noqa: E402
from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402

CLI = [sys.executable, "-m", "rankshard.preprocess.cli"]


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")


_WORKER_PROBE = """
import json, sys, time
from rankshard.preprocess.cli import main  # noqa: F401 - what the console script runs first
from rankshard.preprocess.workers import WorkerPool, own_rss_mb


def rss(_):
    return own_rss_mb()


if __name__ == "__main__":
    start = time.perf_counter()
    with WorkerPool(1, preload=(sys.argv[1],)) as pool:
        while not pool.workers[0].ready:
            pool.wait_any()
        ready = time.perf_counter() - start
        held = pool.submit(rss, None, "its resident memory").get()
    print(json.dumps({"ready_seconds": round(ready, 3), "worker_rss_mb": round(held, 1)}))
"""


def _worker(probe: Path, module: str, rounds: list[dict]):
    """A contender running the probe; each round's figures go to ``rounds``."""
    def go() -> None:
        out = subprocess.run([sys.executable, str(probe), module], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"worker probe failed:\n{out.stderr}")
        rounds.append(json.loads(out.stdout))
    return go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    load_start = os.getloadavg()
    try:
        images, labels = labelled_images(10)  # 100 images: the job itself is a few milliseconds of work
        write_cifar10_archive(tmp / "src" / "cifar-10-python.tar.gz", (images, labels), (images, labels))
        probed: dict[str, list[dict]] = {"worker_shardtask": [], "worker_writer": []}
        probe = tmp / "worker_probe.py"
        probe.write_text(_WORKER_PROBE)
        job = [*CLI, "cifar10", "--source", str(tmp / "src"), "--no-verify-md5", "--split", "test", "--quiet"]

        def cifar(workers: list[str]):
            def go():
                shutil.rmtree(tmp / "out", ignore_errors=True)
                _run([*job, "--out", str(tmp / "out"), *workers])
            return go

        contenders = {
            "import_torch": lambda: _run([sys.executable, "-c", "import torch"]),
            "cli_help": lambda: _run([*CLI, "--help"]),
            "cifar_tiny": cifar([]),
            "cifar_tiny_in_process": cifar(["--workers", "0"]),
            "worker_shardtask": _worker(probe, "rankshard.preprocess.shardtask", probed["worker_shardtask"]),
            "worker_writer": _worker(probe, "rankshard.preprocess.writer", probed["worker_writer"]),
        }
        runs = interleaved(contenders, args.rounds)
        for name, rounds in probed.items():
            for key in ("ready_seconds", "worker_rss_mb"):
                values = [r[key] for r in rounds]
                runs[name][key] = {"rounds": values, "median": statistics.median(values), "best": min(values)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    provenance = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                  "numpy": np.__version__, "rounds": args.rounds, "load_average_start": load_start,
                  "load_average_end": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, rec in runs.items():
        extra = {k: rec[k]["median"] for k in ("ready_seconds", "worker_rss_mb") if k in rec}  # medians
        print(f"{name:24s} median {rec['median_seconds']:6.2f} s  best {rec['best_seconds']:6.2f} s  {extra or ''}")
    write_result({"benchmark": "startup", "provenance": provenance, "runs": runs}, "startup-cpu")


if __name__ == "__main__":
    main()
