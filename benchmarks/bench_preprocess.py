"""End-to-end CIFAR-10-format materialization against a straightforward pipeline, and each against
itself with the SVD disabled (the I/O floor), all measured in the same run.

Straightforward pipeline (the baseline a user would write first): one process; per image, per channel
``np.linalg.svd``; each rank reconstructed and rounded; PIL PNG at its default settings; one
``webdataset.ShardWriter`` per variant. rankshard: ``materialize_split`` with its defaults (batched
engine in the main process, vectorized PNG + hand-written tar in worker processes).

    python benchmarks/bench_preprocess.py [--images 10000] [--workers N]
"""
from __future__ import annotations

import argparse
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

from rankshard.preprocess.pipeline import ArraySource, materialize_split  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402
from rankshard.preprocess.sources.synth import CIFAR10_CLASSES, labelled_images  # noqa: E402

RANKS = (5, 10, 20)


# -- the straightforward pipeline ------------------------------------------------------------------------

def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # PIL defaults, as a first version would
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


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best time of each is kept")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "preprocess-cpu.json")
    args = parser.parse_args()
    images, labels = labelled_images(-(-args.images // 10))
    images, labels = images[: args.images], labels[: args.images]
    tmp = Path(tempfile.mkdtemp(prefix="bench-preprocess-"))
    runs = {}
    contenders = (("straightforward", straightforward, {}),
                  ("straightforward_no_svd", straightforward, {"svd": False}),
                  ("rankshard", rankshard, {"workers": args.workers}),
                  ("rankshard_no_svd", rankshard, {"workers": args.workers, "svd": False}))
    try:
        for r in range(args.rounds):  # interleaved, so a burst of load hits every contender alike
            for name, fn, kw in contenders:
                shutil.rmtree(tmp / name, ignore_errors=True)
                seconds, stats = timed(fn, images, labels, tmp / name, **kw)
                print(f"round {r} {name:24s} {seconds:8.2f} s  {len(images) / seconds:8.0f} img/s", flush=True)
                if name not in runs or seconds < runs[name]["seconds"]:
                    runs[name] = {"seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 1)}
                    if isinstance(stats, dict):
                        runs[name]["stage_seconds"] = {k: stats[k] for k in ("read", "svd", "encode_write")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {
        "rankshard_vs_straightforward": runs["straightforward"]["seconds"] / runs["rankshard"]["seconds"],
        "rankshard_share_of_its_io_floor": runs["rankshard_no_svd"]["seconds"] / runs["rankshard"]["seconds"],
        "straightforward_share_of_its_io_floor":
            runs["straightforward_no_svd"]["seconds"] / runs["straightforward"]["seconds"],
    }
    provenance = {"device": "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
                  "python": platform.python_version(), "machine": platform.machine(), "images": len(images),
                  "image_size": [32, 32], "ranks": list(RANKS), "variants": "full + rank-005/010/020 + spectra",
                  "workers": args.workers, "rounds": args.rounds, "load_average": os.getloadavg()}
    for k, v in ratios.items():
        print(f"{k:40s} {v:6.2f}x")
    print("provenance:", json.dumps(provenance))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs, "ratios": ratios, "provenance": provenance}, indent=2) + "\n")


if __name__ == "__main__":
    main()
