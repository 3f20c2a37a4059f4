"""PGD-20 throughput against its ideal: the cost of 21 forward + backward passes measured in the same run.

A 20-step PGD needs 20 forward + input-gradient backward passes plus one forward of the last iterate (the
best iterate is kept), so 21 forward + backward passes on the same batch bound it from below. Both use the
same model with frozen parameters (no weight gradients), the same batch and device; rounds are interleaved
and the best time of each kept (shared, noisy machines). Reported: samples/s of ``rankshard.train.attacks.pgd`` and of
the evaluation path ``rankshard.evaluate.robustness.attack_batch`` (adds keyed targets/starts and the clean and
adversarial predictions), each as a share of the ideal (goal >= 0.85).

    python benchmarks/bench_pgd.py [--quick] [--device cpu|cuda] [--arch resnet50 --width 64 --batch 8]
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _results import write_result  # noqa: E402  (benchmarks/ is the script's folder)

from rankshard.evaluate.robustness import PGDEvalConfig, attack_batch  # noqa: E402
from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402
from rankshard.train.attacks import PGDConfig, frozen_parameters, pgd, random_targets  # noqa: E402
from rankshard.train.models import build_model  # noqa: E402

STEPS = 20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ideal_passes(model, x, y, passes: int) -> None:
    """The baseline: ``passes`` forward + input-gradient backward passes, nothing else."""
    with frozen_parameters(model), torch.enable_grad():
        for _ in range(passes):
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xi), y, reduction="sum"), [xi])


def best_of(fn, device: torch.device, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def provenance(device: torch.device, args) -> dict:
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        cpu = Path("/proc/cpuinfo")
        names = [ln.split(":", 1)[1].strip() for ln in cpu.read_text().splitlines()
                 if ln.startswith("model name")] if cpu.exists() else []
        hardware = names[0] if names else platform.processor()
    return {"device": str(device), "hardware": hardware, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "model": {"arch": args.arch, "width": args.width, "variant": args.variant, "size": args.size},
            "batch": args.batch, "rounds": args.rounds, "steps": STEPS}


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = build_model(args.arch, args.variant, 10, width=args.width).to(device).eval()
    images, labels = labelled_images(-(-args.batch // 10), size=(args.size, args.size), seed=1)
    x = (torch.from_numpy(images[:args.batch]).permute(0, 3, 1, 2).float() / 255).to(device)
    y = torch.from_numpy(labels[:args.batch]).to(device)
    keys = [f"{i:08d}" for i in range(len(y))]
    attack = PGDConfig("linf", 4 / 255, STEPS, targeted=True)
    target = random_targets(y, 10, torch.Generator(device=device).manual_seed(0))
    cases = {
        "ideal_21_fwd_bwd": lambda: ideal_passes(model, x, y, STEPS + 1),
        "pgd": lambda: pgd(model, x, y, attack, target, torch.Generator(device=device).manual_seed(0)),
        "eval_attack_batch": lambda: attack_batch(model, x, y, keys, 10, PGDEvalConfig(attack)),
    }
    for fn in cases.values():  # warm-up: allocator, cuDNN autotuning, lazy init
        fn()
    seconds = {name: float("inf") for name in cases}
    for _ in range(args.rounds):  # interleaved so that load changes hit every case alike
        for name, fn in cases.items():
            seconds[name] = min(seconds[name], best_of(fn, device, 1))
    ideal = seconds["ideal_21_fwd_bwd"]
    return {"benchmark": "pgd", "provenance": provenance(device, args), "seconds": seconds,
            "samples_per_s": {n: args.batch / s for n, s in seconds.items()},
            "share_of_ideal": {n: ideal / s for n, s in seconds.items() if n != "ideal_21_fwd_bwd"}, "goal": 0.85}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="width-8 resnet18 at 32x32, batch 16, 3 rounds")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--variant", default="cifar", help="cifar (3x3 stem) or imagenet")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/pgd-<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.width, args.batch, args.rounds = "resnet18", 8, 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps(result["provenance"]))
    for name, s in result["seconds"].items():
        share = result["share_of_ideal"].get(name)
        print(f"  {name:20s} {s:8.3f} s  {result['samples_per_s'][name]:9.1f} samples/s"
              + (f"  {share:.3f} of ideal (goal >= 0.85)" if share else ""))
    dev = result["provenance"]["device"].split(":")[0]
    write_result(result, f"pgd-{dev}" + ("-quick" if args.quick else ""), args.out)
    return result


if __name__ == "__main__":
    main()
