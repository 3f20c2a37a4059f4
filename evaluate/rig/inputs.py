"""Images to explain: samples of a split's ``full`` shards (by key or by position) or image files.

Shard samples keep their stored resolution (rank is defined there, SPEC); image files are resized so the
shorter side equals the checkpoint's input size and centre-cropped to a square (bicubic), like the usual
evaluation transform but without the 256/224 crop margin, so nothing of a small test image is lost.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from rankshard.preprocess.format.codec import decode_image
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.tarindex import read_shard

from rankshard.evaluate.data import check_layout, resolve_dataset


@dataclass
class InputBatch:
    """Images ``[N, 3, H, W]`` float32 in [0, 1], their names (shard keys or file names) and labels (or -1)."""

    images: np.ndarray
    names: list[str]
    labels: list[int]


def full_urls(root: str | Path, dataset: str | None, split: str, verify_shards: bool = True) -> list[str]:
    """Shard files of ``ROOT/<dataset>/<split>/full`` in manifest order (the layout every subcommand reads)."""
    from rankshard.loaders import open_variant

    dataset = resolve_dataset(root, dataset)
    check_layout(root, dataset, split, "full")
    return open_variant(root, dataset, split, "full", verify_shards=verify_shards).urls


def parse_index(spec: str) -> range:
    """``"0:16"`` -> positions 0..15, ``"5"`` -> position 5 (positions in manifest order)."""
    try:
        if ":" in spec:
            lo, hi = (int(v) if v else None for v in spec.split(":", 1))
            lo = lo or 0
            if hi is None or hi <= lo or lo < 0:
                raise ValueError
            return range(lo, hi)
        return range(int(spec), int(spec) + 1)
    except ValueError:
        raise RankshardError(f"--index {spec!r}: expected START:STOP with 0 <= START < STOP, e.g. 0:16") from None


def _iter_samples(urls: list[str]) -> Iterable[tuple[str, dict[str, bytes]]]:
    for url in urls:
        yield from read_shard(url)


def _batch(samples: list[tuple[str, dict[str, bytes]]]) -> InputBatch:
    images = np.stack([decode_image(m).transpose(2, 0, 1) for _, m in samples]).astype(np.float32)
    labels = [int(m["cls"]) if "cls" in m else -1 for _, m in samples]
    return InputBatch(images, [k for k, _ in samples], labels)


def read_shard_samples(root: str | Path, dataset: str | None, split: str, keys: list[str] | None = None,
                       index: range | None = None, verify_shards: bool = True) -> InputBatch:
    """Samples of ``split``'s full shards, by key (in the given order) or by manifest position; reading
    stops once everything asked for was found."""
    if (keys is None) == (index is None):
        raise RankshardError("choose the samples with exactly one of --keys K1,K2 or --index START:STOP")
    urls = full_urls(root, dataset, split, verify_shards)
    folder = Path(urls[0]).parent if urls else Path(root)
    wanted = set(keys) if keys is not None else None
    found: dict[str, tuple[str, dict[str, bytes]]] = {}
    picked: list[tuple[str, dict[str, bytes]]] = []
    for pos, (key, members) in enumerate(_iter_samples(urls)):
        if wanted is not None and key in wanted:
            found[key] = (key, members)
            if len(found) == len(wanted):
                break
        elif index is not None and pos in index:
            picked.append((key, members))
            if pos == index[-1]:
                break
    if wanted is not None:
        missing = [k for k in keys if k not in found]
        if missing:
            raise RankshardError(f"{folder}: no sample with key(s) {', '.join(missing[:5])}; keys are 8-digit "
                                 "indices such as 00000000 (see the manifest's num_samples)")
        picked = [found[k] for k in keys]
    elif len(picked) < len(index):
        raise RankshardError(f"{folder}: --index {index.start}:{index.stop} asks for more than the "
                             f"{index.start + len(picked)} samples there")
    return _batch(picked)


def load_image(path: str | Path, size: int) -> np.ndarray:
    """An image file as float32 ``[3, size, size]`` in [0, 1]: shorter side resized to ``size``, centre crop."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = size / min(w, h)
            im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
            left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    except OSError as exc:
        raise RankshardError(f"{path}: not a readable image ({exc})") from exc


def load_image_files(paths: list[str | Path], size: int) -> InputBatch:
    """Image files resized and centre-cropped to ``size`` (labels unknown: -1)."""
    images = np.stack([load_image(p, size) for p in paths])
    return InputBatch(images, [Path(p).name for p in paths], [-1] * len(paths))
