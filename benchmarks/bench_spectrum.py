"""Rank spectrum (the paper's Algorithm 1) as ``rankshard-evaluate spectrum`` runs it, against the literal
algorithm measured in the same run.

Literal baseline: per image, per channel ``np.linalg.svd`` (float64), then one model call per rank on that
single rank-k image. rankshard: one engine decomposition per batch of images, ranks rebuilt on the fly and
batched through the model (``rankshard.evaluate.spectrum.spectrum_records``). The baseline is timed on a few images and
reported per image, since at 224x224 with all ranks it takes minutes per image on a CPU.

    python benchmarks/bench_spectrum.py [--quick] [--device cuda] [--images 1000] [--size 224]
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

from rankshard.evaluate.data import tensor_data  # noqa: E402
from rankshard.evaluate.spectrum import SpectrumConfig, spectrum_records  # noqa: E402
from rankshard.preprocess.rank.engine import RankEngine, reference_low_rank  # noqa: E402
from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402
from rankshard.train.models import build_model  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def literal(model, x: torch.Tensor, ranks: list[int], device: torch.device) -> list[list[int]]:
    """Algorithm 1 literally: for each image and rank, a float64 numpy reconstruction and one forward pass."""
    preds = []
    for img in x:
        x64 = img[None].double().numpy()
        row = []
        for k in ranks:
            xk = torch.from_numpy(reference_low_rank(x64, k)).float().to(device)
            row.append(int(model(xk).argmax(1)))
        preds.append(row)
    return preds


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="32x32 CIFAR-stem ResNet-18 width 16, 64 images")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="images for rankshard (default 1000; quick 64)")
    parser.add_argument("--literal-images", type=int, default=2, help="images for the literal baseline")
    parser.add_argument("--size", type=int, default=None, help="image side (default 224; quick 32)")
    parser.add_argument("--batch", type=int, default=16, help="images per engine decomposition")
    parser.add_argument("--forward-batch", type=int, default=512, help="rank-k images per model call")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or (32 if args.quick else 224)
    count = args.images or (64 if args.quick else 1000)
    arch, variant, width = ("resnet18", "cifar", 16) if args.quick else ("resnet50", "imagenet", 64)
    model = build_model(arch, variant, 10 if args.quick else 1000, width=width).to(device).eval()
    images, labels = labelled_images(-(-count // 10), size=(size, size))
    x = torch.from_numpy(images[:count]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels[:count])
    ranks = list(range(0, size + 1))
    cfg = SpectrumConfig(tuple(ranks), "low", args.forward_batch)
    engine = RankEngine("auto", device)

    data = tensor_data(x, y, 1000, batch_size=args.batch)
    spectrum_records(model, tensor_data(x[:args.batch], y[:args.batch], 1000, args.batch).batches(), engine, cfg,
                     str(device))  # warm-up: cuDNN autotuning, the engine's calibration
    _sync(device)
    t0 = time.perf_counter()
    records = spectrum_records(model, data.batches(), engine, cfg, str(device))
    _sync(device)
    ours = time.perf_counter() - t0

    n_lit = min(args.literal_images, count)
    t0 = time.perf_counter()
    lit = literal(model, x[:n_lit], ranks, device)
    _sync(device)
    lit_per_image = (time.perf_counter() - t0) / n_lit
    agree = np.mean([records[f"{i:08d}"]["preds"] == lit[i] for i in range(n_lit)])

    result = {
        "benchmark": "spectrum",
        "provenance": {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                       "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
                       "python": platform.python_version(), "model": f"{arch} ({variant} stem, width {width})",
                       "image_size": size, "ranks": len(ranks), "svd": engine.describe(),
                       "load_average": os.getloadavg()},
        "rankshard": {"images": count, "seconds": round(ours, 3), "images_per_s": round(count / ours, 3)},
        "literal": {"images": n_lit, "seconds_per_image": round(lit_per_image, 3)},
        "speedup_per_image": round(lit_per_image / (ours / count), 2),
        "literal_prediction_agreement": float(agree),
    }
    print(json.dumps(result, indent=1))
    tag = "-quick" if args.quick else ""
    out = Path(args.out or Path(__file__).parent / "results" / f"spectrum-{device.type}{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{count} images x {len(ranks)} ranks in {ours:.1f} s; literal algorithm {lit_per_image:.2f} s/image "
          f"-> {result['speedup_per_image']}x; wrote {out}")
    return result


if __name__ == "__main__":
    main()
