"""Whole-ResNet-50 weight analysis: batched FFT + svdvals against one stacked ``np.linalg.svd`` call.

    python benchmarks/bench_weights.py [--quick] [--input-size 224] [--dtype float32]

Both sides compute the exact circular operator spectrum of every Conv2d at the resolution it sees
(stride > 1 through the polyphase kernel). Baseline, what a numpy user writes: ``np.fft.fft2`` of the
zero-padded kernel, then ONE stacked ``np.linalg.svd(compute_uv=False)`` over all ``H x W`` frequencies
(no conjugate symmetry), in the same precision as ours (complex64 for --dtype float32). An earlier version
looped in Python over the frequencies: a strawman. ``--rounds`` (3) repeats both; median and best kept.
Also timed: the full analysis (unfolded + operator spectra, RMT statistics,
permuted baselines) as a user runs it. ``--quick`` times the baseline on every 4th conv only and scales
nothing: the ratio is over the same layer subset. Writes benchmarks/results/weights-cpu.json.

Both sides run single-threaded (BLAS/OpenMP thread variables default to 1 before numpy and torch load):
threaded LAPACK on small batched matrices gains nothing and, on a shared 2-vCPU machine, spins at
barriers (a 420 x 128 x 512 complex batch: 49 s with two threads, 2.4-3 s with one).
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._results import cpu_model  # noqa: E402
from rankshard.evaluate.weights.spectra import (WeightsConfig, analyse_model, conv_operator_svdvals, discover_layers,  # noqa: E402
                              dilate_kernel, drop_zero_channels, operator_grid, polyphase_kernel)


def build_model() -> tuple[torch.nn.Module, str]:
    """The project's ResNet-50 (random init: the timing depends on shapes, not on trained values)."""
    from rankshard.train.models import build_model as project_build
    return project_build("resnet50", "imagenet", 1000), "rankshard.train.models.build_model('resnet50', 'imagenet', 1000)"


def stacked_operator_svdvals(weight: np.ndarray, hw: tuple[int, int], stride, dilation, groups,
                             cdtype=np.complex128) -> np.ndarray:
    """Baseline: full fft2, then one stacked np.linalg.svd over every frequency (per group).

    It shares the kernel preparation (dilation, polyphase, dropping all-zero channels) with the batched
    code, so the ratio measures conjugate symmetry, the 1x1 shortcut and torch's batched LAPACK only.
    """
    kernel = polyphase_kernel(dilate_kernel(torch.from_numpy(weight), dilation), stride)
    m1, m2 = operator_grid(hw, stride)
    kernel = kernel.reshape(groups, kernel.shape[0] // groups, *kernel.shape[1:])
    kernel, zeros = drop_zero_channels(kernel, (m1, m2))
    out = [np.zeros(zeros)]
    for g in range(groups):
        spec = np.fft.fft2(kernel[g].numpy(), s=(m1, m2)).astype(cdtype, copy=False)  # [o, c, m1, m2]
        out.append(np.linalg.svd(spec.transpose(2, 3, 0, 1), compute_uv=False).ravel())  # [m1, m2, o, c] stack
    return np.sort(np.concatenate(out))[::-1]


NUMPY_COMPLEX = {torch.complex64: np.complex64, torch.complex128: np.complex128}


def time_spectra(layers, dtype: torch.dtype) -> tuple[float, float, float]:
    """(batched seconds, stacked-numpy seconds, max relative difference of the two spectra) over conv layers,
    both sides in the same precision (``dtype``: complex64 or complex128)."""
    t_fast = t_loop = 0.0
    worst = 0.0
    for info in layers:
        t0 = time.perf_counter()
        fast = conv_operator_svdvals(info.weight, info.input_hw, info.stride, info.dilation, info.groups, dtype)
        t1 = time.perf_counter()
        ref = stacked_operator_svdvals(info.weight.double().numpy(), info.input_hw, info.stride,
                                       info.dilation, info.groups, NUMPY_COMPLEX[dtype])
        t2 = time.perf_counter()
        t_fast, t_loop = t_fast + t1 - t0, t_loop + t2 - t1
        print(f"  {info.name:24s} {tuple(info.weight.shape)} at {info.input_hw} stride {info.stride}: "
              f"batched {t1 - t0:.3f} s, stacked numpy {t2 - t1:.3f} s", file=sys.stderr, flush=True)
        worst = max(worst, float(np.abs(fast.double().numpy() - ref).max() / ref.max()))
    return t_fast, t_loop, worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="time both sides on every 4th conv only")
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of both sides; median and best kept")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "weights-cpu.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, source = build_model()
    cfg = WeightsConfig(input_size=(args.input_size, args.input_size), dtype=args.dtype)
    convs = [layer for layer in discover_layers(model, cfg) if layer.kind == "conv"]
    subset = convs[::4] if args.quick else convs
    cdtype = {"float32": torch.complex64, "float64": torch.complex128}[args.dtype]
    rounds = [time_spectra(subset, cdtype) for _ in range(args.rounds)]  # each round times both, layer by layer
    fast, loop = [r[0] for r in rounds], [r[1] for r in rounds]
    t_fast, t_loop, worst = statistics.median(fast), statistics.median(loop), max(r[2] for r in rounds)
    t0 = time.perf_counter()
    results = analyse_model(model, cfg)
    t_full = time.perf_counter() - t0
    record = {
        "benchmark": "weights", "model": source, "input_size": args.input_size, "dtype": args.dtype,
        "quick": args.quick, "convs_timed": len(subset), "convs_total": len(convs),
        "operator_values_timed": int(sum(np.prod(operator_grid(c.input_hw, c.stride)) * c.groups
                                         * min(c.weight.shape[0] // c.groups, c.weight.shape[1] * np.prod(c.stride))
                                         for c in subset)),
        "batched_operator_s": round(t_fast, 3), "stacked_numpy_operator_s": round(t_loop, 3),
        "rounds": args.rounds, "batched_rounds_s": [round(x, 3) for x in fast],
        "stacked_numpy_rounds_s": [round(x, 3) for x in loop],
        "ratio_stacked_numpy_over_batched": round(t_loop / t_fast, 2),
        "ratio_best": round(min(loop) / min(fast), 2), "max_rel_diff": worst,
        "load_average": os.getloadavg(),
        "full_analysis_s": round(t_full, 3), "full_analysis_layers": len(results),
        "full_analysis_includes": "unfolded+operator spectra, RMT stats, permuted baselines",
        "threads_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                        "OPENBLAS_NUM_THREADS")},
        "device": "cpu", "cpu": cpu_model(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
    }
    print(json.dumps(record, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
