"""Rank engine vs the literal numpy loop: four low ranks of a natural-spectrum batch from one call.

Baseline (measured in the same run): per image, per channel ``np.linalg.svd`` in float64, then the four
reconstructions ``(U_k * s_k) @ Vh_k`` -- Algorithm 1 with one SVD per channel. Each backend computes the
same four ranks with one ``RankEngine.materialize(x, low=ranks)`` call. Rounds are interleaved and the
best time of each is kept, because these machines are shared and noisy.

    python benchmarks/bench_rank_engine.py [--quick] [--device cpu|cuda] [--include-numpy]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rankshard.preprocess.rank.engine import ACCURACY_BAR, RankEngine, available_backends, calibrate  # noqa: E402
from rankshard.preprocess.sources.synth import natural_batch  # noqa: E402

RANKS = (10, 30, 50, 100)
SIZES = {"full": ((32, 512), (224, 32)), "quick": ((32, 256), (224, 12))}  # (side, images)


def numpy_loop(x: np.ndarray, ranks) -> dict[int, np.ndarray]:
    """The baseline: one float64 SVD per channel, then each rank's reconstruction (k >= n gives x)."""
    out = {k: np.empty_like(x) for k in ranks}
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            u, s, vh = np.linalg.svd(x[i, c], full_matrices=False)
            for k in ranks:
                out[k][i, c] = x[i, c] if k >= len(s) else (u[:, :k] * s[:k]) @ vh[:k]
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def bench_size(side: int, count: int, backends: list[str], device: torch.device, rounds: int) -> dict:
    """Best-of-``rounds`` seconds and max error of the baseline and every backend at one image size."""
    x64 = natural_batch(count, size=(side, side), seed=2024)
    x = torch.from_numpy(x64).float().to(device)
    x32 = x.cpu().double().numpy()  # the baseline sees the same float32-rounded pixels as the engine
    engines = {name: RankEngine(name, device) for name in backends}
    setup = {}
    for name, engine in engines.items():  # warm-up; resolves auto (its calibration time is reported apart)
        setup[name], _ = _timed(lambda: engine.materialize(x[:1], low=RANKS))
    best = {name: float("inf") for name in ["numpy-loop", *backends]}
    errors = {}
    for _ in range(rounds):
        seconds, ref = _timed(lambda: numpy_loop(x32, RANKS))
        best["numpy-loop"] = min(best["numpy-loop"], seconds)
        for name, engine in engines.items():
            _sync(device)
            seconds, out = _timed(lambda: (engine.materialize(x, low=RANKS), _sync(device))[0])
            best[name] = min(best[name], seconds)
            errors[name] = max(float(np.abs(out.low[k].cpu().double().numpy() - ref[k]).max()) for k in RANKS)
    base = best["numpy-loop"]
    rows = {name: {"seconds": best[name], "speedup": base / best[name], "max_abs_error": errors[name],
                   "meets_bar": errors[name] <= ACCURACY_BAR, "first_call_seconds": setup[name],
                   "backend": engines[name].describe()["backend"]} for name in backends}
    return {"side": side, "images": count, "channels": 3, "ranks": list(RANKS),
            "baseline_seconds": base, "backends": rows,
            "auto_calibration": vars(calibrate(side, side, device)) if "auto" in backends else None}


def provenance(device: torch.device, rounds: int) -> dict:
    """Where and with what the figures were measured."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        model = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        hardware = model[0] if model else platform.processor()
    info = {"device": str(device), "hardware": hardware, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # other jobs skew ratios
            "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images (256 at 32x32, 12 at 224x224)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; best is kept")
    parser.add_argument("--include-numpy", action="store_true", help="also time the numpy backend")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rank_engine-<dev>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = ["auto"] + [b for b in available_backends(device) if b != "numpy" or args.include_numpy]
    result = {"benchmark": "rank_engine", "provenance": provenance(device, args.rounds), "sizes": []}
    print(json.dumps(result["provenance"]))
    for side, count in SIZES["quick" if args.quick else "full"]:
        row = bench_size(side, count, backends, device, args.rounds)
        result["sizes"].append(row)
        print(f"\n{side}x{side}, {count} images x 3 channels, ranks {list(RANKS)}: "
              f"numpy loop {row['baseline_seconds']:.3f} s")
        for name, r in row["backends"].items():
            label = f"{name} ({r['backend']})" if name == "auto" else name
            print(f"  {label:22s} {r['seconds']:8.3f} s  {r['speedup']:6.2f}x  max err {r['max_abs_error']:.1e}"
                  f"  {'ok' if r['meets_bar'] else 'ABOVE BAR'}")
    out = Path(args.out or Path(__file__).parent / "results" / f"rank_engine-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
