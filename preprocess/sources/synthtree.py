"""Small ILSVRC-like datasets on disk, made of ``synth`` natural images, for the tests and the benchmarks.

Also writes every kind of odd input a real crawl contains (CMYK and greyscale JPEGs, palette and RGBA
PNGs, a PNG named .JPEG, truncated and empty files, a decompression bomb, a text file), so the decoder's
handling of each can be checked end to end.
"""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from rankshard.preprocess.sources.synth import class_images

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475")


def jpeg_bytes(image: np.ndarray, mode: str = "RGB", quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height RGB pixels, with (almost) no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def strip_png(width: int, height: int = 1) -> bytes:
    """A genuine (fully decodable) PNG of an absurd aspect ratio: a few KB that once asked for gigabytes."""
    ramp = (np.arange(width * height, dtype=np.uint32) % 251).astype(np.uint8).reshape(height, width)
    return png_bytes(Image.fromarray(np.stack([ramp] * 3, -1)))


def hostile_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, reason fragment): small files that must be refused before they cost memory."""
    return {
        "hostile_1x5000.png": (strip_png(5000), "aspect ratio"),          # took a worker to 1 GB
        "hostile_1x300000.png": (strip_png(300_000), "aspect ratio"),      # would have needed ~60 GB
        "hostile_20000x20000.png": (bomb_png(20_000, 20_000), "decompression bomb"),
    }


def odd_files(image: np.ndarray) -> dict[str, tuple[bytes, str | None]]:
    """name -> (bytes, expected outcome): "ok" for inputs that must decode, else a reason fragment."""
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 128, np.uint8)], axis=2)
    palette = Image.fromarray(image).convert("P", palette=Image.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    good = jpeg_bytes(image)
    return {
        "odd_cmyk.JPEG": (jpeg_bytes(image, "CMYK"), "ok"),
        "odd_gray.JPEG": (jpeg_bytes(image, "L"), "ok"),
        "odd_palette.png": (png_bytes(palette), "ok"),
        "odd_rgba.png": (png_bytes(Image.fromarray(rgba, "RGBA")), "ok"),
        "odd_png_named.JPEG": (png_bytes(Image.fromarray(image)), "ok"),
        "odd_truncated.JPEG": (good[: len(good) // 2], "truncated"),
        "odd_empty.JPEG": (b"", "empty file"),
        "odd_bomb.JPEG": (bomb_png(), "decompression bomb"),
        "odd_text.JPEG": (b"this is not an image\n" * 4, "not an image"),
    }


def class_files(wnid_index: int, per_class: int, size: tuple[int, int], seed: int = 0) -> dict[str, bytes]:
    """``{wnid}_{i}.JPEG`` -> JPEG bytes of natural-looking images of one class."""
    wnid = WNIDS[wnid_index]
    images = class_images(wnid_index, per_class, size, seed, num_classes=len(WNIDS))
    return {f"{wnid}_{i}.JPEG": jpeg_bytes(img) for i, img in enumerate(images)}


def write_train_tree(root: Path, classes: int = 3, per_class: int = 4, size=(40, 48), odd: bool = True,
                     seed: int = 0) -> dict[str, str]:
    """``root/<wnid>/*.JPEG``; the odd files go into the first class. Returns odd name -> expected outcome."""
    for c in range(classes):
        folder = Path(root) / WNIDS[c]
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in class_files(c, per_class, size, seed).items():
            (folder / name).write_bytes(data)
    expected = {}
    if odd:
        sample = class_images(0, 1, size, seed + 7, num_classes=len(WNIDS))[0]
        for name, (data, outcome) in odd_files(sample).items():
            (Path(root) / WNIDS[0] / name).write_bytes(data)
            expected[f"{WNIDS[0]}/{name}"] = outcome
    return expected


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            _add(tar, name, data)
    return buf.getvalue()


def write_train_tar(path: Path, tree: Path) -> Path:
    """``ILSVRC2012_img_train.tar`` layout: one ``<wnid>.tar`` per class folder of ``tree``."""
    inner = {f"{d.name}.tar": tar_bytes({f.name: f.read_bytes() for f in sorted(d.iterdir())})
             for d in sorted(Path(tree).iterdir()) if d.is_dir()}
    Path(path).write_bytes(tar_bytes(inner))
    return Path(path)


def write_flat_val(folder: Path, classes: int = 3, count: int = 9, size=(48, 40), seed: int = 1) -> list[int]:
    """``ILSVRC2012_val_%08d.JPEG`` files; returns each image's class (0-based wnid position)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = [(2 * i + 1) % classes for i in range(count)]
    for i, label in enumerate(labels):
        img = class_images(label, 1, size, seed + i, num_classes=len(WNIDS))[0]
        (folder / f"ILSVRC2012_val_{i + 1:08d}.JPEG").write_bytes(jpeg_bytes(img))
    return labels
