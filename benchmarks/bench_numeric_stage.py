"""The numeric stage without the SVD (quantization, clip count, leak, energy: ``payloads.variant_payloads``
with backend ``none``), with the clipped-pixel count as the pipeline does it (uint8 mask summed into int32)
against the way anyone writes it first (``mask.sum(1)`` on the bool mask, which torch widens to int64).

Both give the same counts: checked once before timing, through the real SVD (``gram64``), on images whose
low-rank reconstructions leave [0, 1] (the ``none`` engine's copies never do). Cases: CIFAR (1000 images 32x32, ranks 5/10/20) and
ImageNet size (30 images 224x224, ranks 30/40/50/100), one torch thread, interleaved rounds, median and best.

    python benchmarks/bench_numeric_stage.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._results import cpu_model, interleaved, write_result  # noqa: E402
from rankshard.preprocess import payloads  # noqa: E402
from rankshard.preprocess.devices import torch_threads  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402
from rankshard.preprocess.sources.synth import class_images, labelled_images  # noqa: E402


def _stored_png_bool_sum(xk: torch.Tensor):
    """``payloads._stored_png`` with the first-written count: the baseline."""
    q = (xk * 255).round_().clamp_(0, 255)
    flat = xk.flatten(1)
    clipped = ((flat < 0) | (flat > 1)).sum(1) / flat.shape[1]
    return q.to(torch.uint8), q.div_(255), clipped


@contextlib.contextmanager
def _baseline_count():
    saved = dict(payloads.STORAGE)
    payloads.STORAGE.update(png=_stored_png_bool_sum, raw=_stored_png_bool_sum)
    try:
        yield
    finally:
        payloads.STORAGE.update(saved)


def _check_same_counts(images: np.ndarray, variants) -> None:
    svd = payloads.make_engine("gram64")
    with torch_threads(1):
        ours = payloads.variant_payloads(svd, variants, images)
        with _baseline_count():
            theirs = payloads.variant_payloads(svd, variants, images)
    clips = [(ours[v.name]["clip_fraction"], theirs[v.name]["clip_fraction"]) for v in variants if v.mode == "low"]
    assert all(np.array_equal(a, b) for a, b in clips), "the two counts must agree"
    assert any((a > 0).any() for a, _ in clips), "the check needs reconstructions that leave [0, 1]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cases = {"cifar32": (labelled_images(100)[0], (5, 10, 20)),
             "imagenet224": (class_images(0, 30, (224, 224), seed=3, num_classes=5), (30, 40, 50, 100))}
    engine = payloads.make_engine("none")
    contenders = {}
    for case, (images, ranks) in cases.items():
        variants = ShardSpec("cifar10", "train", ranks=ranks).variants()
        # ranks 1 and 2 as well: low ranks of natural images overshoot [0, 1] most
        _check_same_counts(images, ShardSpec("cifar10", "train", ranks=tuple(sorted({1, 2, *ranks}))).variants())
        for name, ctx in (("pipeline", contextlib.nullcontext), ("bool_sum", _baseline_count)):
            def go(ctx=ctx, images=images, variants=variants):
                with torch_threads(1), ctx():
                    payloads.variant_payloads(engine, variants, images)
            contenders[f"{case}_{name}"] = go
    load_start = os.getloadavg()
    runs = interleaved(contenders, args.rounds)
    ratios = {case: round(runs[f"{case}_bool_sum"]["median_seconds"] / runs[f"{case}_pipeline"]["median_seconds"], 3)
              for case in cases}
    for case, r in ratios.items():
        print(f"{case:12s} numeric stage without SVD: {r:.2f}x faster than with the bool-sum count")
    provenance = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "python": platform.python_version(), "threads": 1, "rounds": args.rounds,
                  "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_result({"benchmark": "numeric_stage", "provenance": provenance, "runs": runs,
                  "speedup_vs_bool_sum": ratios}, "numeric_stage-cpu")


if __name__ == "__main__":
    main()
