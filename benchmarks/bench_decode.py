"""JPEG decode + resize + center crop to 224x224: the pipeline's CPU decoder vs torchvision's ``decode_jpeg``,
on the CPU and on a GPU (issue #13: decode stays on CPU workers unless a GPU decoder is available; measure it).

All contenders get the same JPEG bytes: synthetic natural images (the project's generator) at ImageNet's
sizes, 256-480 px a side, quality 90, and produce uint8 224x224 RGB with the ImageNet geometry (shorter side
to 256, antialiased bilinear; center crop 224):

- ``pipeline_cpu``: ``preprocess.sources.images.decode`` (PIL), what each CPU worker runs, one image at a
  time on one thread: its images/s is per core;
- ``torchvision_cpu``: ``torchvision.io.decode_jpeg`` on the CPU + ``resize(antialias=True)`` + crop, one
  torch thread (per core, like the pipeline's);
- ``torchvision_cuda``: ``decode_jpeg(device="cuda")`` on the whole batch (nvJPEG), resize and crop on the
  GPU, synchronized: the images/s of one GPU, counting the host-to-device copy of the JPEG bytes.

Each contender's pixels are also compared with the pipeline's (max and mean |difference|): another decoder
or resize kernel changes the stored bytes, so using one is a configuration change recorded with the data,
never a silent speed-up. Contenders that cannot run here (no torchvision, no CUDA) are reported as skipped.
Rounds are interleaved; median and best kept; load, CPU model and versions recorded.

    python benchmarks/bench_decode.py [--images 500] [--rounds 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._results import cpu_model, interleaved, write_result  # noqa: E402
from rankshard.preprocess.devices import torch_threads  # noqa: E402
from rankshard.preprocess.sources.images import Geometry, decode  # noqa: E402
from rankshard.preprocess.sources.synth import class_images  # noqa: E402
from rankshard.preprocess.sources.synthtree import jpeg_bytes  # noqa: E402

GEOMETRY = Geometry(256, 224)


def jpegs(n: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = (int(v) for v in rng.integers(256, 481, size=2))
        out.append(jpeg_bytes(class_images(i % 5, 1, (h, w), seed=i, num_classes=5)[0], quality=90))
    return out


def pipeline_cpu(data: list[bytes]) -> np.ndarray:
    return np.stack([decode(d, GEOMETRY) for d in data])


def _torchvision_geometry(img: torch.Tensor) -> torch.Tensor:
    """CHW uint8 -> 224x224 with the pipeline's geometry (its shorter-side rule, antialiased bilinear)."""
    from torchvision.transforms.v2 import functional as F

    w, h = GEOMETRY.resized_size(img.shape[-1], img.shape[-2])
    img = F.resize(img, [h, w], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    return F.center_crop(img, [GEOMETRY.crop, GEOMETRY.crop])


def torchvision_decode(data: list[bytes], device: str) -> np.ndarray:
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
    out = torch.stack([_torchvision_geometry(img) for img in images])
    if device != "cpu":
        torch.cuda.synchronize(device)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    diff = np.abs(reference.astype(np.int16) - other.astype(np.int16))
    return {"max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 4),
            "share_of_pixels_equal": round(float((diff == 0).mean()), 4)}


def contenders(data: list[bytes], device: str) -> tuple[dict, dict]:
    """Runnable contenders (name -> fn returning extras) and the skipped ones with the reason."""
    reference = pipeline_cpu(data)
    runnable, skipped = {}, {}

    def timed(fn):
        def go():
            with torch_threads(1):
                return {"agreement_with_pipeline": agreement(reference, fn())}
        return go

    runnable["pipeline_cpu"] = timed(lambda: pipeline_cpu(data))
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - an import that fails for any reason means: not measured here
        skipped["torchvision_cpu"] = skipped["torchvision_cuda"] = f"torchvision does not import: {exc}"
        return runnable, skipped
    runnable["torchvision_cpu"] = timed(lambda: torchvision_decode(data, "cpu"))
    if device.startswith("cuda") and torch.cuda.is_available():
        torchvision_decode(data[:8], device)  # nvJPEG's first call sets up its handles: not part of a round
        runnable["torchvision_cuda"] = timed(lambda: torchvision_decode(data, device))
    else:
        skipped["torchvision_cuda"] = "no CUDA device"
    return runnable, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    data = jpegs(args.images)
    load_start = os.getloadavg()
    runnable, skipped = contenders(data, args.device)
    runs = interleaved(runnable, args.rounds)
    for name, rec in runs.items():
        rec["images_per_s"] = round(args.images / rec["median_seconds"], 1)
        print(f"{name:18s} median {rec['median_seconds']:7.3f} s  best {rec['best_seconds']:7.3f} s  "
              f"{rec['images_per_s']:9.1f} img/s  vs pipeline: {rec['agreement_with_pipeline']}")
    for name, why in skipped.items():
        print(f"{name:18s} skipped: {why}")
    try:
        import torchvision
        tv_version = torchvision.__version__
    except Exception:  # noqa: BLE001
        tv_version = None
    provenance = {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None,
                  "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                  "torchvision": tv_version, "python": platform.python_version(), "images": args.images,
                  "jpeg": "synthetic natural images, 256-480 px a side, quality 90",
                  "geometry": "shorter side 256 (antialiased bilinear), center crop 224", "threads": 1,
                  "rounds": args.rounds, "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_result({"benchmark": "decode", "provenance": provenance, "runs": runs, "skipped": skipped},
                 f"decode-{args.device.split(':')[0]}")


if __name__ == "__main__":
    main()
