"""Encodings at 224 x 224: encode ms, bytes per sample and loader samples/s for png, raw, npy and factors-K.

What is measured, for one rank-k variant (default k = 32: the reconstruction a rank-32 run stores) of
ImageNet-size images with natural spectra (the project's synthetic generator, ``preprocess/sources/synth.py``,
plus every bundled photo found offline: matplotlib's ``grace_hopper.jpg`` cut into a few crops, and
scikit-image's photos when it is installed; all resized to 224 x 224; nothing is downloaded):

* **encode ms per sample**: the pipeline's own encoder for the variant (``variants.MEMBER_ENCODERS``, as
  ``writer.write_shard_job`` calls it, PNG at the project's default zlib level ``ShardSpec.png_level``) over
  the payload the pipeline builds (``pipeline.variant_payloads``: SVD, quantization, float16), on 1 thread;
  ``+ tar`` adds writing the shard (``format.tar.write_shard``: json, cls, headers, sha256);
* **bytes per sample**: of shards written by the real pipeline (``pipeline.materialize_split``): the data
  members (png / npy / u+s+v) and the whole tar (json, cls, 512-byte headers and padding included), also per
  image source, and what ImageNet's 1,281,167 training images would take;
* **loader samples/s**: one epoch of the real loader (``loaders.eval_loader`` over those shards, ``workers=0``,
  1 torch thread: what one DataLoader worker delivers) as float32 batches, for factors-K at k = K, at the k
  the others store and at a smaller k; ``factors … handed over`` is the loader with ``reconstruct_on='none'``
  (what the CPU does when the GPU reconstructs) and ``… on DEVICE`` the loader reconstructing after the
  transfer (``--device cuda`` on a GPU machine; on the CPU it is the main process). ``decode µs`` is the
  per-sample decoder alone (``loaders.decode.decode_sample``) on members already in memory.

Rounds are interleaved (every case once per round); median and best are reported with the CPU model, the
load average before and after, library versions and thread counts.

    python benchmarks/bench_encodings.py [--quick] [--rank 32] [--factors 32,64] [--small-k 8] [--rounds 3]
                                         [--samples 250] [--device cpu|cuda] [--out PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from _results import write_result  # noqa: E402  (benchmarks/ is the script's folder)

from rankshard.loaders import LoaderConfig, eval_loader, open_variant  # noqa: E402
from rankshard.loaders.decode import decode_sample  # noqa: E402
from rankshard.preprocess.format.tar import write_shard  # noqa: E402
from rankshard.preprocess.format.tarindex import read_shard  # noqa: E402
from rankshard.preprocess.format.variants import MEMBER_ENCODERS, shard_samples  # noqa: E402
from rankshard.preprocess.pipeline import ArraySource, materialize_split, variant_payloads  # noqa: E402
from rankshard.preprocess.rank.engine import RankEngine  # noqa: E402
from rankshard.preprocess.sources.synth import labelled_images  # noqa: E402
from rankshard.preprocess.spec import ShardSpec  # noqa: E402

SIDE = 224
JPEG_REPEAT = 50  # decodes of the reference JPEG per round
IMAGENET_TRAIN = 1_281_167
DATA_MEMBERS = ("png", "npy", "u.npy", "s.npy", "v.npy")
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "coins", "brick", "grass", "gravel")


# -- images ---------------------------------------------------------------------------------------------


def _square(im: Image.Image, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    im = im.convert("RGB")
    if box is None:  # centre square, as the ImageNet geometry's centre crop
        s = min(im.size)
        left, top = (im.width - s) // 2, (im.height - s) // 2
        box = (left, top, left + s, top + s)
    return np.asarray(im.crop(box).resize((SIDE, SIDE), Image.BICUBIC))


def grace_hopper_jpeg() -> bytes | None:
    """The real JPEG photo matplotlib ships (512 x 600), or None."""
    try:
        import matplotlib.cbook

        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
            return f.read()
    except Exception:  # matplotlib missing, or a build without its sample data
        return None


def jpeg_reference() -> float | None:
    """Seconds for what a standard ImageNet loader does per sample before any augmentation maths: decode a
    JPEG photo and resize it to 224 x 224 (PIL, bilinear); a reference for the decode rates, not an encoding."""
    data = grace_hopper_jpeg()
    if data is None:
        return None

    def one():
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR))

    return _timed(lambda: [one() for _ in range(JPEG_REPEAT)])


def bundled_photos() -> tuple[list[np.ndarray], list[str]]:
    """224 x 224 crops of the photos that installed packages ship (never downloaded)."""
    photos, names = [], []
    data = grace_hopper_jpeg()
    if data is not None:
        im = Image.open(io.BytesIO(data))
        im.load()
        w, h = im.size  # 512 x 600: the centre square, and four overlapping 320 x 320 crops at other scales
        boxes = [None] + [(x, y, x + 320, y + 320) for x, y in ((0, 0), (w - 320, 0), (0, h - 320), (w - 320, h - 320))]
        for i, box in enumerate(boxes):
            photos.append(_square(im, box))
            names.append(f"matplotlib:grace_hopper#{i}")
    try:
        import skimage.data

        for name in SKIMAGE_PHOTOS:
            img = getattr(skimage.data, name)()
            photos.append(_square(Image.fromarray(img)))
            names.append(f"skimage:{name}")
    except Exception:
        pass
    return photos, names


def make_images(synthetic: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """uint8 [N, 224, 224, 3], labels, and each image's source (``synth:...`` or ``<package>:<photo>``)."""
    images, labels = labelled_images(-(-synthetic // 10), size=(SIDE, SIDE), seed=0)
    images, labels = images[:synthetic], labels[:synthetic]
    ids = [f"synth:{i}" for i in range(synthetic)]
    photos, names = bundled_photos()
    if photos:
        images = np.concatenate([images, np.stack(photos)])
        labels = np.concatenate([labels, np.arange(len(photos)) % 10])
        ids += names
    return images, labels, ids


# -- cases ----------------------------------------------------------------------------------------------


def cases(rank: int, factors: list[int], small_k: int) -> list[dict]:
    """name, the ShardSpec options that store it, the variant folder, the loader k's (None: not factors)."""
    out = [{"name": f"png (zlib {ShardSpec.png_level})", "key": "png", "spec": {"ranks": (rank,), "encoding": "png"},
            "variant": f"rank-{rank:03d}", "ks": [None]},
           {"name": "raw (uint8 npy)", "key": "raw", "spec": {"ranks": (rank,), "encoding": "raw"},
            "variant": f"rank-{rank:03d}", "ks": [None]},
           {"name": "npy (float16)", "key": "npy", "spec": {"ranks": (rank,), "encoding": "npy"},
            "variant": f"rank-{rank:03d}", "ks": [None]}]
    for K in factors:
        ks = sorted({K, min(rank, K), min(small_k, K)}, reverse=True)
        out.append({"name": f"factors-{K} (float16 u,s,v)", "key": f"factors-{K}",
                    "spec": {"ranks": (), "factors": K}, "variant": f"factors-{K:03d}", "ks": ks})
    return out


def materialize(root: Path, case: dict, images, labels, ids, shard_size: int) -> Path:
    info = {"kind": "bench", "path": "memory", "fingerprint": f"bench-encodings-{len(ids)}", "checksum_verified": False}
    source = ArraySource(images, labels, ids, tuple("abcdefghij"), info)
    spec = ShardSpec("bench", "val", shuffle=False, spectra=False, shard_size=shard_size, workers=0,
                     backend="gram64", device="cpu", batch_size=50, **case["spec"])
    materialize_split(source, spec, root / case["key"], show_progress=False)
    return root / case["key"] / "bench" / "val" / case["variant"]


def sizes(folder: Path, ids: list[str]) -> dict:
    """Bytes per sample from the shards on disk: whole tars, data members, data members per image source."""
    tars = sorted(folder.glob("*.tar"))
    per_source: dict[str, list[int]] = {}
    n = 0
    for tar in tars:
        for key, members in read_shard(tar):
            data = sum(len(members[m]) for m in DATA_MEMBERS if m in members)
            per_source.setdefault(ids[int(key)].split(":")[0], []).append(data)
            n += 1
    tar_bytes = sum(p.stat().st_size for p in tars)
    data = [b for v in per_source.values() for b in v]
    return {"samples": n, "tar_bytes_per_sample": round(tar_bytes / n), "data_bytes_per_sample": round(np.mean(data)),
            "data_bytes_by_source": {k: round(float(np.mean(v))) for k, v in sorted(per_source.items())},
            "imagenet_train_gb": round(tar_bytes / n * IMAGENET_TRAIN / 1e9, 1)}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str = "cpu") -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


class Case:
    """One encoding: its shards, its payload and members in memory, and the timed operations."""

    def __init__(self, spec: dict, root: Path, images, labels, ids, engine: RankEngine, shard_size: int,
                 device: str):
        self.spec, self.device = spec, device
        self.folder = materialize(root, spec, images, labels, ids, shard_size)
        self.info = open_variant(self.folder)  # hashes the shards once, outside every timing
        self.variant = ShardSpec("bench", "val", **spec["spec"]).variants()[1]  # [0] is full
        assert self.variant.name == spec["variant"]
        self.payload = variant_payloads(engine, [self.variant], images)[self.variant.name]
        self.meta = {"key": [f"{i:08d}" for i in range(len(ids))], "index": list(range(len(ids))),
                     "label": labels.tolist(), "source": ids, "class_name": ["x"] * len(ids), "height": SIDE,
                     "width": SIDE}
        self.members = [m for tar in sorted(self.folder.glob("*.tar")) for _, m in read_shard(tar)]
        self.n = len(ids)
        self.scratch = root / f"scratch-{spec['key']}.tar"

    def encode(self) -> float:
        return _timed(lambda: MEMBER_ENCODERS[self.variant.encoding](self.payload, ShardSpec.png_level))

    def encode_write(self) -> float:
        return _timed(lambda: write_shard(self.scratch, shard_samples(self.variant, self.payload, self.meta,
                                                                      ShardSpec.png_level)))

    def decode(self, k: int | None) -> float:
        enc = self.info.encoding
        return _timed(lambda: [decode_sample(m, enc, k) for m in self.members])

    def loader(self, k: int | None, where: str = "auto", device: str | None = None) -> float:
        cfg = LoaderConfig(batch_size=32, workers=0, pin_memory=False, drop_last=False, factors_k=k,
                           reconstruct_on=where, device=device)

        def epoch():
            got = sum(len(b) for b in eval_loader(self.info, cfg, rank=0, world_size=1))
            assert got == self.n, f"{self.spec['key']}: {got} of {self.n} samples"

        return _timed(epoch, device or "cpu")

    def timings(self) -> dict:
        """Every timed operation of this case (name -> a thunk returning seconds for all samples)."""
        out = {"encode": self.encode, "encode_write": self.encode_write}
        factors = self.info.encoding == "factors"
        for k in self.spec["ks"]:
            tag = "" if k is None else f"@{k}"
            out[f"decode{tag}"] = lambda k=k: self.decode(k)
            out[f"loader{tag}"] = lambda k=k: self.loader(k, "workers" if factors else "auto")
            if factors:
                out[f"loader_on_device{tag}"] = lambda k=k: self.loader(k, "device", self.device)
        if factors:
            out["loader_handed_over"] = lambda: self.loader(None, "none")
        return out


def _stats(seconds: list[float], n: int, per: str) -> dict:
    """median and best as ms per sample (``per='ms'``) or samples per second (``per='rate'``)."""
    med, best = statistics.median(seconds), min(seconds)
    if per == "ms":
        return {"median_ms": round(med / n * 1e3, 3), "best_ms": round(best / n * 1e3, 3)}
    return {"median": round(n / med, 1), "best": round(n / best, 1)}


# -- provenance and report ------------------------------------------------------------------------------


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    models = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines()
              if ln.startswith("model name")] if info.exists() else []
    return models[0] if models else platform.processor() or platform.machine()


def provenance(args, rounds: int, photos: list[str]) -> dict:
    try:
        from threadpoolctl import threadpool_info
        blas = [{k: i.get(k) for k in ("internal_api", "version", "num_threads")} for i in threadpool_info()]
    except ImportError:
        blas = None
    hardware = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else None
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "gpu": hardware, "device": args.device,
            "load_average_before": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION, "torch_threads": torch.get_num_threads(),
            "blas": blas, "loader_workers": 0, "rounds": rounds, "photos": photos,
            "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
            "note": "1 thread everywhere (torch, BLAS, zlib): per-core figures; a loader with W workers scales about W x "
                    "while cores last. Shared machine: load average recorded before and after."}


def table(result: dict) -> str:
    rank = result["config"]["rank"]
    lines = [f"| encoding (rank-{rank} images, {SIDE}²) | encode ms | + tar ms | bytes/sample (data / tar) | "
             "data bytes synth / photo | full-rank data bytes synth / photo | ImageNet train | "
             "loader samples/s (median / best) | decode µs |",
             "|---|---|---|---|---|---|---|---|---|"]

    def by_source(s: dict | None) -> str:
        if not s:
            return ""
        b = s["data_bytes_by_source"]
        photo = [v for k, v in b.items() if k != "synth"]
        return f"{b.get('synth', 0):,} / " + (f"{round(np.mean(photo)):,}" if photo else "–")
    for name, c in result["cases"].items():
        enc, wr, sz = c["encode"], c["encode_write"], c["sizes"]
        loaders = [(k, v) for k, v in c.items() if k.startswith("loader")]
        first = True
        for key, v in loaders:
            label = name if first else ""
            k = key.split("@")[1] if "@" in key else None
            what = {"loader": "", "loader_on_device": f" after the transfer ({result['provenance']['device']})",
                    "loader_handed_over": " handed over (reconstruct_on='none')"}[key.split("@")[0]]
            kk = f"k={k}" if k else ("" if "handed" in key else "")
            decode = c.get(f"decode@{k}" if k else "decode")
            cells = [label, f"{enc['median_ms']:.2f}" if first else "", f"{wr['median_ms']:.2f}" if first else "",
                     f"{sz['data_bytes_per_sample']:,} / {sz['tar_bytes_per_sample']:,}" if first else "",
                     by_source(sz) if first else "", by_source(c.get("full_sizes")) if first else "",
                     f"{sz['imagenet_train_gb']} GB" if first else "",
                     f"{kk}{what}: {v['median']:,.0f} / {v['best']:,.0f}".lstrip(": "),
                     f"{decode['median_ms'] * 1e3:,.0f}" if decode and "on_device" not in key and "handed" not in key else ""]
            lines.append("| " + " | ".join(cells) + " |")
            first = False
    ref = result.get("reference", {}).get("jpeg_decode_resize")
    if ref:
        lines.append(f"| *reference: JPEG photo decode + resize to {SIDE}² (PIL)* | | | {ref['jpeg_bytes']:,} (512×600) "
                     f"| | | | {ref['samples_per_s']['median']:,.0f} / {ref['samples_per_s']['best']:,.0f} "
                     f"| {ref['decode']['median_ms'] * 1e3:,.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="40 synthetic images instead of 250 (a smoke run)")
    parser.add_argument("--samples", type=int, default=None, help="synthetic images (photos are added to them)")
    parser.add_argument("--rank", type=int, default=32, help="the rank-k variant stored as png/raw/npy")
    parser.add_argument("--factors", default="32,64", help="K of the factors-K variants, comma-separated")
    parser.add_argument("--small-k", type=int, default=8, help="also reconstruct factors at this smaller k")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and best kept)")
    parser.add_argument("--device", default="cpu", help="where the loader reconstructs factors after the transfer")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/encodings-<device>.json)")
    args = parser.parse_args(argv)
    synthetic = args.samples or (40 if args.quick else 250)
    factors = [int(k) for k in args.factors.split(",") if k]

    try:
        from threadpoolctl import threadpool_limits
        one_blas_thread = threadpool_limits(1)
    except ImportError:  # pip install rankshard[bench]; without it BLAS keeps its threads (recorded: blas None)
        one_blas_thread = contextlib.nullcontext()

    torch.set_num_threads(1)
    with one_blas_thread, tempfile.TemporaryDirectory(prefix="bench-encodings-") as tmp:
        images, labels, ids = make_images(synthetic)
        photos = [i for i in ids if not i.startswith("synth:")]
        result = {"provenance": provenance(args, args.rounds, photos),
                  "config": {"side": SIDE, "rank": args.rank, "factors": factors, "small_k": args.small_k,
                             "synthetic_images": synthetic, "photos": len(photos), "samples": len(ids),
                             "png_level": ShardSpec.png_level, "svd_backend": "gram64", "quick": args.quick},
                  "cases": {}}
        print(f"{len(ids)} images ({synthetic} synthetic, {len(photos)} photos) at {SIDE}x{SIDE}; "
              f"load {os.getloadavg()}", flush=True)
        engine = RankEngine("gram64", "cpu")
        shard_size = -(-len(ids) // 2)  # two shards, so the loader crosses a shard boundary
        built = {}
        for spec in cases(args.rank, factors, args.small_k):
            t0 = time.perf_counter()
            built[spec["name"]] = Case(spec, Path(tmp), images, labels, ids, engine, shard_size, args.device)
            print(f"  materialized {spec['name']} in {time.perf_counter() - t0:.1f} s", flush=True)
        seconds: dict[str, dict[str, list[float]]] = {name: {} for name in built}
        jpeg: list[float] = []
        for r in range(args.rounds):  # interleaved: every case, every operation, once per round
            for name, case in built.items():
                for op, fn in case.timings().items():
                    seconds[name].setdefault(op, []).append(fn())
            ref = jpeg_reference()
            if ref is not None:
                jpeg.append(ref)
            print(f"  round {r + 1}/{args.rounds} done; load {os.getloadavg()}", flush=True)
        n = len(ids)
        for name, case in built.items():
            row = {"variant": case.variant.name, "sizes": sizes(case.folder, ids)}
            if case.info.encoding != "factors":  # the full-rank images in the same encoding (ImageNet stores them too)
                row["full_sizes"] = sizes(case.folder.parent / "full", ids)
            for op, secs in seconds[name].items():
                row[op] = _stats(secs, n, "ms" if op.startswith(("encode", "decode")) else "rate")
            result["cases"][name] = row
        if jpeg:
            result["reference"] = {"jpeg_decode_resize": {
                "what": "PIL decode of matplotlib's grace_hopper.jpg (512 x 600, a real photo) + bilinear resize to "
                        "224 x 224: the per-sample CPU work of a standard JPEG ImageNet loader, not a rankshard encoding",
                "jpeg_bytes": len(grace_hopper_jpeg()), "decode": _stats(jpeg, JPEG_REPEAT, "ms"),
                "samples_per_s": _stats(jpeg, JPEG_REPEAT, "rate")}}
        result["provenance"]["load_average_after"] = os.getloadavg()
    print(table(result))
    write_result(result, f"encodings-{torch.device(args.device).type}" + ("-quick" if args.quick else ""), args.out)
    return result


if __name__ == "__main__":
    main()
