"""Batched RIG vs the literal per-rank loop: images/s over all ranks of natural-spectrum images.

Baseline (measured in the same run): Eq. 3 literally, per image: one float64 ``np.linalg.svd`` per channel,
then for every rank k = 1..n its reconstruction, one forward and one backward pass, the channel reduction
and the weighted sum. The candidate is ``rankshard.evaluate.rig.rank_ig.rig``: one decomposition per image through the rank
engine, all ranks through the model ``--batch-size`` at a time, one backward pass per batch. Both explain
the same images with the same model; the max-abs difference between their maps is reported too. Rounds
are interleaved and the best time of each kept (shared, noisy machines).

    python benchmarks/bench_rig.py [--quick] [--device cpu|cuda] [--arch resnet50 --variant imagenet
                                   --size 224 --width 64]      # the H200 setting of issue 7
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _results import write_result  # noqa: E402  (benchmarks/ is the script's folder)

from rankshard.evaluate.rig.rank_ig import RIGConfig, rig  # noqa: E402
from rankshard.preprocess.rank.engine import RankEngine  # noqa: E402
from rankshard.preprocess.sources.synth import natural_batch  # noqa: E402
from rankshard.train.models import build_model  # noqa: E402

PRESETS = {  # name -> (arch, variant, width, side, images)
    "quick": ("resnet18", "cifar", 8, 32, 2),
    "cpu": ("resnet18", "cifar", 16, 32, 4),
}


def literal_rig(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """Eq. 3 with one SVD per channel (numpy float64) and one forward/backward per rank."""
    c, h, w = x.shape
    n = min(h, w)
    with torch.no_grad():
        target = int(model(x[None]).argmax())
    svds = [np.linalg.svd(x[ch].double().cpu().numpy(), full_matrices=False) for ch in range(c)]
    total = torch.zeros(h, w, device=x.device)
    for k in range(1, n + 1):
        xk = np.stack([(u[:, :k] * s[:k]) @ vh[:k] for u, s, vh in svds])
        t = torch.tensor(xk, dtype=x.dtype, device=x.device, requires_grad=True)
        (g,) = torch.autograd.grad(torch.softmax(model(t[None])[0], 0)[target], t)
        total += (n - k) / n * g.abs().amax(0)
    return total.cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def run(args, device: torch.device) -> dict:
    """Best-of-rounds seconds per image for the loop and the batched RIG, their ratio and the map error."""
    torch.manual_seed(0)
    model = build_model(args.arch, args.variant, 10, width=args.width).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # both sides: input gradients only
    x = torch.from_numpy(natural_batch(args.images, size=(args.size, args.size), seed=7)).float().to(device)
    engine = RankEngine(args.svd_backend, device=device)
    cfg = RIGConfig(batch_size=args.batch_size)
    rig(model, x[0], cfg, engine)  # warm-up: engine calibration, cuDNN autotuning, allocator
    best = {"loop": float("inf"), "batched": float("inf")}
    for _ in range(args.rounds):
        t_loop, loop_maps = _timed(lambda: [literal_rig(model, xi) for xi in x], device) if args.loop else (None, None)
        t_batched, maps = _timed(lambda: [rig(model, xi, cfg, engine).map.cpu().numpy() for xi in x], device)
        best["batched"] = min(best["batched"], t_batched)
        if t_loop is not None:
            best["loop"] = min(best["loop"], t_loop)
    n = len(x)
    result = {"images": n, "ranks_per_image": min(args.size, args.size) - 1, "batch_size": args.batch_size,
              "batched": {"seconds_per_image": best["batched"] / n, "images_per_s": n / best["batched"]},
              "svd": engine.describe()}
    if args.loop:
        err = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)) for a, b in zip(loop_maps, maps))
        result["loop"] = {"seconds_per_image": best["loop"] / n, "images_per_s": n / best["loop"]}
        result["speedup"] = best["loop"] / best["batched"]
        result["max_rel_map_difference"] = err
    return result


def provenance(device: torch.device, args) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
            "arch": args.arch, "variant": args.variant, "width": args.width, "size": args.size,
            "rounds": args.rounds}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny net, 2 images (seconds)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--variant", default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side (n = size ranks)")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64, help="ranks per forward/backward pass")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-loop", dest="loop", action="store_false", help="skip the (slow) literal loop")
    parser.add_argument("--svd-backend", default="auto")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/rig-<device>.json)")
    args = parser.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "cpu"]
    for name, value in zip(("arch", "variant", "width", "size", "images"), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    device = torch.device(args.device)
    result = {"provenance": provenance(device, args), **run(args, device)}
    print(json.dumps(result["provenance"]))
    line = f"batched RIG: {result['batched']['images_per_s']:.3f} images/s " \
           f"({result['batched']['seconds_per_image']:.3f} s/image, {result['ranks_per_image']} ranks)"
    if args.loop:
        line += f"; literal loop: {result['loop']['images_per_s']:.3f} images/s; speedup x{result['speedup']:.2f}" \
                f"; max relative map difference {result['max_rel_map_difference']:.2e}"
    print(line)
    write_result(result, f"rig-{device.type}" + ("-quick" if args.quick else ""), args.out)
    return result


if __name__ == "__main__":
    main()
