"""End-to-end ImageNet-style materialization at 224x224: images/s with the SVD vs the same pipeline without.

Writes an ILSVRC-like train tree of synthetic natural JPEGs (sizes around ImageNet's ~400x350), then runs
the real ``imagenet`` pipeline twice in this process: ranks {30,40,50,100} + full + spectra, and the
identical job with ``--backend none`` (every stage but the SVD). The ratio is what matters: this machine
is shared and noisy; absolute figures only mean something on a dedicated box.

    python benchmarks/bench_imagenet_pipeline.py [--quick] [--images N] [--workers W]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rankshard.preprocess.imagejob import Placement, imagenet_source, run_image_job  # noqa: E402
from rankshard.preprocess.sources.images import Geometry  # noqa: E402
from rankshard.preprocess.pipeline import peak_rss_mb  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402
from rankshard.preprocess.sources.synth import class_images  # noqa: E402
from rankshard.preprocess.sources.synthtree import WNIDS, jpeg_bytes  # noqa: E402

RANKS = (30, 40, 50, 100)


def write_tree(root: Path, images: int) -> None:
    """``images`` JPEGs over 5 classes, 256..480 px on a side (ImageNet's typical range)."""
    rng = np.random.default_rng(0)
    per_class = -(-images // len(WNIDS))
    for c, wnid in enumerate(WNIDS):
        folder = root / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(256, 481, size=2))
            img = class_images(c, 1, (h, w), seed=i, num_classes=len(WNIDS))[0]
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg_bytes(img, quality=90))


def run(root: Path, out: Path, backend: str, workers: int, device: str) -> dict:
    source = imagenet_source(root, "train", Geometry(224, 224), out / "imagenet/train/.listing")
    spec = ShardSpec(dataset="imagenet", split="train", ranks=RANKS, backend=backend, device=device,
                     workers=workers, shard_size=100, batch_size=50)
    start = time.perf_counter()
    result = run_image_job(source, spec, out, placement=Placement(), show_progress=False)
    seconds = time.perf_counter() - start
    stats = result["stats"]
    return {"backend": result["manifests"]["full"]["svd"]["backend"], "seconds": round(seconds, 3),
            "images": stats["images"], "images_per_s": round(stats["images"] / seconds, 2),
            "time_split": {k: stats[k] for k in ("read", "decode", "svd", "encode_write", "write_wait")},
            "worker_rss_mb": stats["peak_rss_mb"]["worker"],  # this run's largest worker, its own peak
            "bytes": sum(s["bytes"] for m in result["manifests"].values() for s in m["shards"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images instead of 1000")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = parser.parse_args()
    images = args.images or (200 if args.quick else 1000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tmp = Path(tempfile.mkdtemp(prefix="bench-imagenet-"))
    try:
        write_tree(tmp / "src", images)
        results = {}
        for name, backend in (("svd", "auto"), ("no_svd", "none"), ("svd_again", "auto")):
            results[name] = run(tmp / "src", tmp / f"out-{name}", backend, args.workers, device)
            print(f"{name:10s} {results[name]['images_per_s']:8.1f} img/s  {results[name]['time_split']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best_svd = max(results["svd"]["images_per_s"], results["svd_again"]["images_per_s"])
    ratio = best_svd / results["no_svd"]["images_per_s"]
    provenance = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
                  "cpu_count": os.cpu_count(), "workers": args.workers, "torch": torch.__version__,
                  "numpy": np.__version__, "python": platform.python_version(), "images": images,
                  "geometry": "shorter side 224, center crop 224", "ranks": list(RANKS),
                  "variants": "full + rank-030/040/050/100 + spectra, png level 1",
                  "load_average": list(os.getloadavg()), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "peak_rss_mb": peak_rss_mb(max(r["worker_rss_mb"] or 0 for r in results.values())),
                  "note": "shared, noisy machine: compare the ratio, not absolutes"}
    print(f"end-to-end with SVD / without SVD = {ratio:.3f}  ({device}, {args.workers} workers, {images} images)")
    out = Path(__file__).resolve().parent / "results" / f"imagenet_pipeline-{device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"benchmark": "imagenet_pipeline", "provenance": provenance, "results": results,
                               "ratio_svd_vs_no_svd": round(ratio, 3)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
