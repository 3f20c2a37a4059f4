"""Training-step throughput: bf16 autocast + channels_last against fp32 NCHW, measured in the same run.

Each case runs ``Trainer.train_step`` (the real code path: lr update, forward, label-smoothed CE,
backward, SGD-Nesterov step) on a fixed batch of natural-spectrum images for ResNet-50 with the CIFAR stem
(32x32) and the ImageNet stem (224x224). Modes alternate round by round and the best round of each is
kept, because these machines are shared and noisy. The figure is images per second of training; the
ratio ``bf16_cl / fp32`` is the speed-up of the fast mode. On CPU, bf16 autocast often is *slower*
(few CPUs have bf16 matrix units); that is reported as measured.

    python benchmarks/bench_train_step.py [--quick] [--device cpu|cuda] [--compile]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rankshard.train.config import from_preset  # noqa: E402
from rankshard.train.data import TensorData  # noqa: E402
from rankshard.train.trainer import Trainer  # noqa: E402

MODES = {"fp32": {"precision": "fp32", "channels_last": "off"},     # the baseline
         "bf16_cl": {"precision": "bf16", "channels_last": "on"}}
# (stem, image side, batch, timed steps per round) per device and size class
CASES = {
    "cuda": {"full": [("cifar", 32, 512, 20), ("imagenet", 224, 256, 10)],
             "quick": [("cifar", 32, 256, 5), ("imagenet", 224, 64, 3)]},
    "cpu": {"full": [("cifar", 32, 32, 3), ("imagenet", 224, 8, 2)],
            "quick": [("cifar", 32, 16, 2), ("imagenet", 224, 4, 1)]},
}


def provenance(device: torch.device, rounds: int) -> dict:
    """Where and with what the figures were measured."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")] if Path("/proc/cpuinfo").exists() else []
        hardware = names[0] if names else platform.processor()
    return {"device": str(device), "hardware": hardware, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "rounds": rounds, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}


def _trainer(stem: str, side: int, batch: int, mode: dict, device: torch.device, compile_: bool, run_dir: str):
    data = TensorData.synthetic(per_class=-(-batch // 10), size=side, test_per_class=1)
    cfg = from_preset("cifar10-fast", {"model_variant": stem, "batch_size": str(batch), "device": device.type,
                                       "compile": compile_, **mode})
    trainer = Trainer(cfg, run_dir, data, log=lambda _m: None)
    batch_data = next(iter(data.train_batches(0, batch, 0, 1)))
    return trainer, batch_data


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _round(trainer: Trainer, batch, steps: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batch)
    _sync(device)
    return time.perf_counter() - start


def bench_case(stem: str, side: int, batch: int, steps: int, device: torch.device, rounds: int,
               compile_: bool) -> dict:
    """Best-of-``rounds`` images/s of each mode for one model/size, modes interleaved round by round."""
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {name: _trainer(stem, side, batch, mode, device, compile_, tmp) for name, mode in MODES.items()}
        for trainer, b in trainers.values():  # warm-up: allocator, cuDNN autotuning, compilation
            _round(trainer, b, 2 if device.type == "cuda" else 1, device)
        best = {name: float("inf") for name in MODES}
        for _ in range(rounds):
            for name, (trainer, b) in trainers.items():
                best[name] = min(best[name], _round(trainer, b, steps, device))
    rates = {name: batch * steps / seconds for name, seconds in best.items()}
    return {"model": f"resnet50-{stem}", "image_size": side, "batch": batch, "steps_per_round": steps,
            "images_per_s": rates, "ratio_bf16_cl_over_fp32": rates["bf16_cl"] / rates["fp32"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per mode (default 3, quick 2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both modes")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step-<dev>.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 3)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    result = {"benchmark": "train_step", "baseline": "fp32 NCHW", "provenance": provenance(device, rounds),
              "quick": args.quick, "compile": args.compile, "cases": []}
    print(json.dumps(result["provenance"]))
    for stem, side, batch, steps in CASES[device.type]["quick" if args.quick else "full"]:
        case = bench_case(stem, side, batch, steps, device, rounds, args.compile)
        result["cases"].append(case)
        r = case["images_per_s"]
        print(f"{case['model']:18s} {side:3d}px batch {batch:4d}: fp32 {r['fp32']:9.1f} img/s  "
              f"bf16+channels_last {r['bf16_cl']:9.1f} img/s  ratio {case['ratio_bf16_cl_over_fp32']:.2f}x")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_step-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
