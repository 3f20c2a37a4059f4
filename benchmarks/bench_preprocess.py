"""End-to-end CIFAR-10-format materialization against a straightforward pipeline, and each against
itself with the SVD disabled (the I/O floor), all measured in the same run.

Straightforward pipeline (the baseline a user would write first): one process; per image, per channel
``np.linalg.svd``; each rank reconstructed and rounded; PIL PNG at the same zlib level as ours (PIL's
default 6 would charge the baseline for a different trade-off); one ``webdataset.ShardWriter`` per
variant. rankshard: ``materialize_split`` with its defaults (on CPU cores - 1 workers and the main process
each make whole shards: batched SVD, quantization, vectorized PNG, tar). Scaling efficiency: the same job
in one process pinned to one core (``--workers 0``) and with the default P = cores processes,
img/s(P) / (P x img/s(1)). Rounds are interleaved; median and best kept. Goals (issue #13):
>= 2.5x the straightforward pipeline and >= 0.9 of rankshard's own SVD-free floor, at 4k and 60k images;
scaling >= 0.85.

    python benchmarks/bench_preprocess.py [--images 10000] [--workers N] [--rounds 3] [--only NAME,...]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from benchmarks._results import cpu_model, eigh_seconds, floor_bound, interleaved, one_core, write_result  # noqa: E402
from rankshard.preprocess.devices import process_cores  # noqa: E402
from rankshard.preprocess.options import default_workers  # noqa: E402
from rankshard.preprocess.pipeline import ArraySource, materialize_split  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402
from rankshard.preprocess.sources.synth import CIFAR10_CLASSES, labelled_images  # noqa: E402

RANKS = (5, 10, 20)
PNG_LEVEL = ShardSpec.png_level


# -- the straightforward pipeline ------------------------------------------------------------------------

def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=PNG_LEVEL)  # our level: same trade-off
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def straightforward(images: np.ndarray, labels: np.ndarray, out: Path, svd: bool = True) -> None:
    import webdataset as wds

    names = ["full", *[f"rank-{k:03d}" for k in RANKS], "spectra"]
    writers = {}
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        writers[name] = wds.ShardWriter(str(out / name / "train-%06d.tar"), maxcount=1000, verbose=0)
    order = np.random.default_rng(0).permutation(len(images))
    for idx, i in enumerate(order):
        img, key, cls = images[i], f"{idx:08d}", str(int(labels[i]))
        x = img.astype(np.float64) / 255
        writers["full"].write({"__key__": key, "png": _png(img), "cls": cls})
        recs, spectra = {k: np.empty_like(x) for k in RANKS}, np.zeros((3, 32))
        for c in range(3):
            if svd:
                u, s, vh = np.linalg.svd(x[:, :, c])
                spectra[c] = s
                for k in RANKS:
                    recs[k][:, :, c] = (u[:, :k] * s[:k]) @ vh[:k]
            else:
                for k in RANKS:
                    recs[k][:, :, c] = x[:, :, c]
        for k in RANKS:
            q = np.round(np.clip(recs[k], 0, 1) * 255).astype(np.uint8)
            writers[f"rank-{k:03d}"].write({"__key__": key, "png": _png(q), "cls": cls})
        writers["spectra"].write({"__key__": key, "s.npy": _npy(spectra.astype(np.float32)), "cls": cls})
    for w in writers.values():
        w.close()


# -- rankshard with and without the SVD ----------------------------------------------------------------

def rankshard(images, labels, out: Path, workers: int, svd: bool = True) -> dict:
    source = ArraySource(images, labels, [f"bench:{i}" for i in range(len(labels))], CIFAR10_CLASSES,
                         {"kind": "bench", "path": "memory", "fingerprint": "bench", "checksum_verified": False})
    # backend "none" runs the same pipeline with every SVD replaced by a copy: the I/O floor
    spec = ShardSpec("cifar10", "train", ranks=RANKS, workers=workers, backend="auto" if svd else "none")
    return materialize_split(source, spec, out, show_progress=False)["stats"]


def _contenders(images, labels, tmp: Path, workers: int) -> dict:
    def run(name, fn, pinned=False, **kw):
        def go():
            shutil.rmtree(tmp / name, ignore_errors=True)
            with one_core() if pinned else contextlib.nullcontext():
                stats = fn(images, labels, tmp / name, **kw)
            return {"stage_seconds": {k: stats[k] for k in ("read", "svd", "encode_write", "peak_rss_mb")}} if stats else None
        return go
    return {"straightforward": run("straightforward", straightforward),
            "straightforward_no_svd": run("straightforward_no_svd", straightforward, svd=False),
            "rankshard": run("rankshard", rankshard, workers=workers),
            "rankshard_no_svd": run("rankshard_no_svd", rankshard, workers=workers, svd=False),
            "rankshard_one_process": run("rankshard_one_process", rankshard, workers=0, pinned=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=default_workers(), help="default: cores - 1 (+ the main process)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; median and best are kept")
    parser.add_argument("--only", default=None, help="comma-separated contenders (default: all five)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/preprocess-cpu-<images>.json")
    args = parser.parse_args()
    images, labels = labelled_images(-(-args.images // 10))
    images, labels = images[: args.images], labels[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    load_start = os.getloadavg()
    contenders = _contenders(images, labels, tmp, args.workers)
    if args.only:
        contenders = {name: contenders[name] for name in args.only.split(",")}
    try:
        runs = interleaved(contenders, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for rec in runs.values():
        rec["images_per_s"] = round(len(images) / rec["median_seconds"], 1)
    med = {name: r["median_seconds"] for name, r in runs.items()}
    wanted = {
        "rankshard_vs_straightforward": ("straightforward", "rankshard", 1),
        "rankshard_share_of_its_io_floor": ("rankshard_no_svd", "rankshard", 1),
        "straightforward_share_of_its_io_floor": ("straightforward_no_svd", "straightforward", 1),
        f"scaling_efficiency_1_to_{process_cores()}_processes": ("rankshard_one_process", "rankshard", process_cores()),
    }
    ratios = {k: med[a] / (w * med[b]) for k, (a, b, w) in wanted.items() if a in med and b in med}
    if "rankshard_no_svd" in med:  # no exact CPU pipeline can beat this share of the floor (benchmarks/_results.py)
        eigh = eigh_seconds(images)
        ratios["rankshard_floor_share_upper_bound"] = floor_bound(med["rankshard_no_svd"], eigh, process_cores())
        ratios["eigh_seconds_one_thread"] = eigh
    provenance = {"device": "cpu", "cpus": os.cpu_count(), "cpu_model": cpu_model(), "torch": torch.__version__,
                  "numpy": np.__version__, "python": platform.python_version(), "machine": platform.machine(),
                  "images": len(images), "image_size": [32, 32], "ranks": list(RANKS),
                  "variants": "full + rank-005/010/020 + spectra", "png_level": PNG_LEVEL, "workers": args.workers,
                  "rounds": args.rounds, "load_average_start": load_start, "load_average_end": os.getloadavg(),
                  "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    for k, v in ratios.items():
        print(f"{k:40s} {v:6.2f}x")
    print("provenance:", json.dumps(provenance))
    write_result({"runs": runs, "ratios": ratios, "provenance": provenance}, f"preprocess-cpu-{len(images)}", args.out)


if __name__ == "__main__":
    main()
