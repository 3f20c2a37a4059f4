"""Where every benchmark writes its JSON (imported by the scripts beside it)."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(result: dict, name: str, out: str | Path | None = None) -> Path:
    """Write ``result`` to ``out`` or ``benchmarks/results/<name>.json``, print and return the path."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def cpu_model() -> str:
    """The CPU's marketing name (``platform.processor()`` is often just the architecture on Linux)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def eigh_seconds(images) -> float:
    """Seconds for the float64 eigendecomposition of each channel's Gram matrix of ``images`` (uint8 NHWC) on
    one CPU thread: the faster of torch's (MKL) and numpy's LAPACK ``eigh``, best of 3 each.

    That decomposition is the cheapest route measured here that meets the 1e-4 accuracy bar at every size
    (``gram64``, which ``auto`` picks on CPU): every SVD driver is slower, LAPACK's subset solver (``syevr``
    for the top k only, via scipy) was slower at 224x224, and float32 routes miss the bar's calibration margin
    at 224x224. So it bounds how close a pipeline doing that decomposition on the CPU can come to its
    SVD-free floor: with P processes sharing the work perfectly, floor / (floor + eigh_seconds / P) at most.
    """
    import time

    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from rankshard.preprocess.devices import torch_threads

    def best_of_3(fn) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    x = torch.from_numpy(images).permute(0, 3, 1, 2).double().div(255).flatten(0, 1)
    if x.shape[-2] < x.shape[-1]:
        x = x.mT
    with torch_threads(1), threadpool_limits(1):
        gram = x.mT @ x
        return min(best_of_3(lambda: torch.linalg.eigh(gram)), best_of_3(lambda: np.linalg.eigh(gram.numpy())))


def floor_bound(floor_seconds: float, eigh: float, processes: int) -> float:
    """The largest share of its SVD-free floor a CPU pipeline doing the float64 Gram eigendecomposition can
    reach (see ``eigh_seconds``)."""
    return floor_seconds / (floor_seconds + eigh / processes)


@contextlib.contextmanager
def one_core():
    """Run the block pinned to one core (Linux affinity): the one-process baseline of a scaling figure, with
    every library that sizes its thread pool by the allowed cores (rankshard's torch share included) on 1."""
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(saved)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def interleaved(contenders: dict, rounds: int, report=print) -> dict:
    """Run every ``name -> fn()`` once per round, in turn (a burst of load hits them all alike).

    ``fn`` returns extra fields to keep (or None). Returns per name: every round's seconds, median, best,
    and the last round's extras.
    """
    import os
    import statistics
    import time

    runs: dict = {name: {"rounds": []} for name in contenders}
    for r in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            extra = fn()
            seconds = time.perf_counter() - start
            runs[name]["rounds"].append(round(seconds, 3))
            runs[name].update(extra or {})
            report(f"round {r} {name:24s} {seconds:8.2f} s  load {os.getloadavg()[0]:.1f}")
    for rec in runs.values():
        rec["median_seconds"] = round(statistics.median(rec["rounds"]), 3)
        rec["best_seconds"] = min(rec["rounds"])
    return runs
