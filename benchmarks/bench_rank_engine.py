"""Rank engine vs what a capable user writes: four low ranks of a natural-spectrum batch from one call.

Baselines (measured in the same run, on the same number of threads as ours, pinned with threadpoolctl
for BLAS/LAPACK and ``torch.set_num_threads`` for torch; default 1, what each pipeline worker gets):

* ``numpy-loop``: per image, per channel ``np.linalg.svd`` in float64, then ``(U_k * s_k) @ Vh_k``
  (Algorithm 1 with one SVD per channel);
* ``torch64-batched`` / ``torch32-batched``: one batched ``torch.linalg.svd`` call in float64 / float32,
  then the same products.

Each engine backend computes the same four ranks with one ``RankEngine.materialize(x, low=ranks)`` call.
Rounds are interleaved; median and best are reported (shared, noisy machine). With scikit-image installed,
the accuracy of every contender is also measured on its bundled photos resized to each size (the SPEC's
bar is about natural images, and float32 passes or fails on them, not on synthetic batches).

    python benchmarks/bench_rank_engine.py [--quick] [--device cpu|cuda] [--threads T] [--include-numpy]
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
SIZES = {"full": ((32, 512), (224, 32), (512, 6)), "quick": ((32, 256), (224, 12), (512, 3))}  # (side, images)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "moon", "coins", "brick", "grass",
          "gravel", "page")


def numpy_loop(x: np.ndarray, ranks) -> dict[int, np.ndarray]:
    """The baseline: one float64 SVD per channel, then each rank's reconstruction (k >= n gives x)."""
    out = {k: np.empty_like(x) for k in ranks}
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            u, s, vh = np.linalg.svd(x[i, c], full_matrices=False)
            for k in ranks:
                out[k][i, c] = x[i, c] if k >= len(s) else (u[:, :k] * s[:k]) @ vh[:k]
    return out


def torch_batched(x: torch.Tensor, ranks, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """The batched baseline: one ``torch.linalg.svd`` over the whole batch in ``dtype``, then each rank."""
    u, s, vh = torch.linalg.svd(x.to(dtype), full_matrices=False)
    us = u * s[..., None, :]
    return {k: (us[..., :k] @ vh[..., :k, :]).float() for k in ranks}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def _contenders(x: torch.Tensor, engines: dict, device: torch.device) -> dict:
    """name -> zero-argument callable returning {k: low rank k} (as numpy float64)."""
    def as_np(out: dict) -> dict:
        return {k: v.cpu().double().numpy() for k, v in out.items()}

    x_np = x.cpu().double().numpy()  # the baselines see the same float32-rounded pixels as the engine
    calls = {"numpy-loop": lambda: numpy_loop(x_np, RANKS),
             "torch64-batched": lambda: as_np(torch_batched(x, RANKS, torch.float64)),
             "torch32-batched": lambda: as_np(torch_batched(x, RANKS, torch.float32))}
    for name, engine in engines.items():
        calls[name] = lambda e=engine: as_np(e.materialize(x, low=RANKS).low)
    return {name: (lambda fn=fn: (fn(), _sync(device))[0]) for name, fn in calls.items()}


def bench_size(side: int, count: int, backends: list[str], device: torch.device, rounds: int, threads: int) -> dict:
    """Median/best seconds and max error of every contender at one image size (interleaved rounds)."""
    x = torch.from_numpy(natural_batch(count, size=(side, side), seed=2024)).float().to(device)
    engines = {name: RankEngine(name, device, workers=threads) for name in backends}
    setup = {name: _timed(lambda e=e: e.materialize(x[:1], low=RANKS))[0] for name, e in engines.items()}
    calls = _contenders(x, engines, device)
    times = {name: [] for name in calls}
    errors = {}
    for _ in range(rounds):
        for name, fn in calls.items():
            seconds, out = _timed(fn)
            times[name].append(seconds)
            if name == "numpy-loop":
                ref = out
            else:
                errors[name] = max(float(np.abs(out[k] - ref[k]).max()) for k in RANKS)
    med = {name: float(np.median(t)) for name, t in times.items()}
    rows = {name: {"median_seconds": med[name], "best_seconds": min(times[name]), "rounds": times[name],
                   "speedup_vs_numpy_loop": med["numpy-loop"] / med[name],
                   "speedup_vs_torch64_batched": med["torch64-batched"] / med[name],
                   "speedup_vs_torch32_batched": med["torch32-batched"] / med[name],
                   "max_abs_error": errors.get(name, 0.0), "meets_bar": errors.get(name, 0.0) <= ACCURACY_BAR}
            for name in calls}
    for name in backends:
        rows[name].update(first_call_seconds=setup[name], backend=engines[name].describe()["backend"])
    return {"side": side, "images": count, "channels": 3, "ranks": list(RANKS), "contenders": rows,
            "auto_calibration": vars(calibrate(side, side, device)) if "auto" in backends else None}


def photo_errors(side: int, backends: list[str], device: torch.device) -> dict | None:
    """Max-abs error vs float64 numpy of each contender on scikit-image's bundled photos at ``side``."""
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        return None
    imgs = []
    for name in PHOTOS:
        a = getattr(skimage.data, name)()
        a = np.stack([a] * 3, -1) if a.ndim == 2 else a[..., :3]
        imgs.append(np.asarray(Image.fromarray(a.astype(np.uint8)).resize((side, side), Image.BICUBIC)))
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div(255).to(device)
    calls = _contenders(x, {name: RankEngine(name, device) for name in backends}, device)
    ranks = [k for k in RANKS if k < side]
    ref = calls.pop("numpy-loop")()
    return {name: max(float(np.abs(fn()[k] - ref[k]).max()) for k in ranks) for name, fn in calls.items()}


def blas_info() -> list[dict]:
    """Which BLAS/OpenMP libraries are loaded, with their kernel (architecture) and thread count."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"note": "threadpoolctl not installed (pip install rankshard[bench])"}]
    keep = ("internal_api", "version", "architecture", "num_threads", "filepath")
    return [{k: info.get(k) for k in keep} for info in threadpool_info()]


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
            "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                           "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
            "blas": blas_info()}
    try:
        import cupy
        info["cupy"] = cupy.__version__
    except ImportError:
        info["cupy"] = None
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images per size")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (median and best kept)")
    parser.add_argument("--threads", type=int, default=1, help="threads for every contender (BLAS, torch, ours)")
    parser.add_argument("--include-numpy", action="store_true", help="also time the numpy backend")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rank_engine-<dev>.json)")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backends = ["auto"] + [b for b in available_backends(device) if b not in ("numpy", "randomized") or args.include_numpy]
    torch.set_num_threads(args.threads)
    with threadpool_limits(args.threads):
        result = {"benchmark": "rank_engine", "provenance": {**provenance(device, args.rounds), "threads": args.threads},
                  "sizes": []}
        print(json.dumps(result["provenance"]))
        for side, count in SIZES["quick" if args.quick else "full"]:
            row = bench_size(side, count, backends, device, args.rounds, args.threads)
            row["photo_max_abs_error"] = photo_errors(side, backends, device)
            result["sizes"].append(row)
            _print_size(row)
    result["provenance"]["load_average_end"] = os.getloadavg()
    out = Path(args.out or Path(__file__).parent / "results" / f"rank_engine-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


def _print_size(row: dict) -> None:
    print(f"\n{row['side']}x{row['side']}, {row['images']} images x 3 channels, ranks {list(RANKS)} (median of rounds)")
    photos = row["photo_max_abs_error"] or {}
    for name, r in row["contenders"].items():
        label = f"{name} ({r['backend']})" if name == "auto" else name
        photo = f"  photos {photos[name]:.1e}" if name in photos else ""
        print(f"  {label:22s} {r['median_seconds']:8.3f} s (best {r['best_seconds']:.3f})  vs numpy-loop "
              f"{r['speedup_vs_numpy_loop']:5.2f}x  vs torch64 {r['speedup_vs_torch64_batched']:5.2f}x  vs torch32 "
              f"{r['speedup_vs_torch32_batched']:5.2f}x  err {r['max_abs_error']:.1e}{photo}")


if __name__ == "__main__":
    main()
