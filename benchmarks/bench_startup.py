"""Fixed start-up cost: what a small job pays before and besides its images (issue #13, "small jobs").

Each figure is the wall time of a fresh process, since that is what a user's command pays (in-process
benchmarks import torch once and calibrate once, and so hide this):

- ``import_torch``: ``python -c "import torch"``, the floor of any torch-based tool (the baseline);
- ``cli_help``: ``rankshard-preprocess --help`` (the CLI's own import; it used to import torch);
- ``cifar_tiny``: ``rankshard-preprocess cifar10 --split test`` on a 100-image archive (default workers),
  so images cost next to nothing and what is left is start-up, calibration, pool, lock, manifests;
- ``cifar_tiny_in_process``: the same with ``--workers 0``;
- ``worker_ready_shardtask`` / ``worker_ready_writer``: from opening a one-worker pool to its "ready",
  preloading what a CPU worker (decode + SVD + write: torch) or a GPU-path worker (decode + write: no
  torch) imports.

Rounds are interleaved; median and best kept; load and CPU model recorded.

    python benchmarks/bench_startup.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
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
from rankshard.preprocess.workers import WorkerPool  # noqa: E402

CLI = [sys.executable, "-m", "rankshard.preprocess.cli"]


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")


def _worker_ready(module: str) -> None:
    with WorkerPool(1, preload=(module,)) as pool:
        while not pool.workers[0].ready:
            pool.wait_any()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    load_start = os.getloadavg()
    try:
        images, labels = labelled_images(10)  # 100 images: the job itself is a few milliseconds of work
        write_cifar10_archive(tmp / "src" / "cifar-10-python.tar.gz", (images, labels), (images, labels))
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
            "worker_ready_shardtask": lambda: _worker_ready("rankshard.preprocess.shardtask"),
            "worker_ready_writer": lambda: _worker_ready("rankshard.preprocess.writer"),
        }
        runs = interleaved(contenders, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    provenance = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                  "numpy": np.__version__, "rounds": args.rounds, "load_average_start": load_start,
                  "load_average_end": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, rec in runs.items():
        print(f"{name:24s} median {rec['median_seconds']:6.2f} s  best {rec['best_seconds']:6.2f} s")
    write_result({"benchmark": "startup", "provenance": provenance, "runs": runs}, "startup-cpu")


if __name__ == "__main__":
    main()
