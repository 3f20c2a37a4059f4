"""Listings of generic image datasets: ImageFolder trees and existing WebDataset shards.

Tars are never extracted: ``format.tarindex`` scans their member headers once and each image is recorded
by its byte offset, so readers ``pread`` the bytes in place (an uncompressed tar stores members verbatim).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from rankshard.preprocess.errors import SourceError
from rankshard.preprocess.format.tarindex import TarDamage, iter_tar, split_name
from rankshard.preprocess.sources.listing import Listing

# torchvision's ImageFolder extensions (matched case-insensitively): others are ignored, not errors
# What PIL decodes; a GIF contributes its first frame (palette -> RGB like any palette image)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


GZIP_MAGIC = b"\x1f\x8b"


def tar_members(f, start: int = 0, size: int | None = None, what: str = "tar") -> list[tuple[str, int, int]]:
    """``(name, absolute data offset, size)`` of every regular file in the uncompressed tar at ``start``."""
    try:
        return [(m.name, m.offset, m.size) for m in iter_tar(f, start, size)]
    except TarDamage as exc:
        hint = (" It is gzip-compressed: compressed tars cannot be read in place; decompress it once (the ImageNet "
                "archives are plain tars)." if os.pread(f.fileno(), 2, start) == GZIP_MAGIC else
                " Is the file complete? Download or copy it again.")
        raise SourceError(f"{what}: not a readable uncompressed tar ({exc}).{hint}") from None


def file_md5(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()


def _listing(kind: str, rows: list[tuple[str, int, int, int, str]], containers: list[str],
             classes, class_names=None, extra=None, watch=()) -> Listing:
    """Listing from rows ``(container index, offset, size, label, id)``."""
    cols = list(zip(*rows)) if rows else [(), (), (), (), ()]
    return Listing(containers, np.asarray(cols[0], dtype=np.int32), np.asarray(cols[1], dtype=np.int64),
                   np.asarray(cols[2], dtype=np.int64), np.asarray(cols[3], dtype=np.int64), list(cols[4]),
                   tuple(classes), tuple(class_names or classes), kind, dict(extra or {}), tuple(watch))


# -- ImageFolder ------------------------------------------------------------------------------------------


def class_dirs(root: Path) -> list[str]:
    """Sorted class folder names of an ImageFolder root (hidden folders skipped)."""
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder. Pass the root of a <class>/<image> tree.")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise SourceError(f"{root}: no class folders inside; expected ROOT/<class>/<image> (ImageFolder layout)")
    return names


def _image_files(folder: Path, nested: list | None = None) -> list[str]:
    """Image files below ``folder`` (recursive, symlinks followed), relative, sorted; the folders read below
    ``folder`` are appended to ``nested`` as (path, mtime_ns), for the listing cache to check.

    Symlinked folders are followed (datasets are often assembled from links) but each real folder is
    visited once: a link back up the tree would otherwise list every image again on every lap until
    the path length runs out.
    """
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames.clear()
            continue
        seen.add((st.st_dev, st.st_ino))
        if nested is not None and dirpath != str(folder):
            nested.append((os.path.abspath(dirpath), st.st_mtime_ns))
        dirnames.sort()
        rel = os.path.relpath(dirpath, folder)
        found += [os.path.normpath(os.path.join(rel, n)) for n in filenames
                  if n.lower().endswith(IMG_EXTENSIONS) and not n.startswith(".")]
    return sorted(found)


def folder_signature(root: Path, classes: list[str]) -> list:
    """Cheap change detector for a tree: a folder's mtime changes whenever a file is added or removed."""
    return [str(root.resolve()), [(c, (root / c).stat().st_mtime_ns) for c in classes]]


def list_folder(root: Path, kind: str = "folder", class_names: dict[str, str] | None = None,
                prefix: str = "") -> Listing:
    """ImageFolder listing: class index = position of the folder name in sorted order."""
    classes = class_dirs(root)
    containers, rows, nested = [], [], []
    for label, cls in enumerate(classes):
        for rel in _image_files(root / cls, nested):
            rows.append((len(containers), 0, -1, label, f"{prefix}{cls}/{rel}"))
            containers.append(str(root / cls / rel))
    if not rows:
        raise SourceError(f"{root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class folders")
    names = [class_names.get(c, c) for c in classes] if class_names else None
    return _listing(kind, rows, containers, classes, names, watch=nested)


# -- existing WebDataset shards ------------------------------------------------------------------------


def expand_urls(pattern: str) -> list[str]:
    """Brace-expand ``shards-{000000..000099}.tar`` (several patterns may be joined with '::')."""
    import braceexpand

    return [url for part in pattern.split("::") for url in braceexpand.braceexpand(part)]


def _class_index(data: bytes, path: str, key: str) -> int:
    """A ``.cls`` member's integer class index; anything else names the shard and sample."""
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise SourceError(f"{path}: sample {key!r} has .cls {data[:40]!r}, not an integer class index; the wds "
                          "source needs labels 0..C-1 in .cls (map names to indices first)") from None


def _wds_samples(path: str) -> list[tuple[str, int, int, int]]:
    """(key, image offset, image size, class) per sample of one WebDataset tar (members grouped by key)."""
    samples: dict[str, dict] = {}
    with open(path, "rb") as f:
        for name, offset, size in tar_members(f, what=path):
            key, ext = split_name(name)
            sample = samples.setdefault(key, {})
            if ext.lower() in WDS_IMAGE_EXTS and "image" not in sample:
                sample["image"] = (offset, size)
            elif ext == "cls":
                sample["cls"] = _class_index(os.pread(f.fileno(), size, offset), path, key)
    out = []
    for key, s in samples.items():
        if "image" not in s or "cls" not in s:
            raise SourceError(f"{path}: sample {key!r} lacks an image ({'/'.join(WDS_IMAGE_EXTS)}) or a .cls "
                              "member; the wds source needs both")
        out.append((key, *s["image"], s["cls"]))
    return out


# Classes are 0..max(.cls); ImageNet-21k has 21,841. A stray huge label would make millions of empty classes.
MAX_WDS_CLASSES = 100_000


def list_wds(urls: list[str]) -> Listing:
    """Listing of existing shards, in shard then member order; classes are the integers seen (0..max)."""
    rows, containers = [], []
    for url in urls:
        if not Path(url).is_file():
            raise SourceError(f"{url}: no such shard (only local paths are read; download remote shards first)")
        for key, offset, size, cls in _wds_samples(url):
            rows.append((len(containers), offset, size, cls, f"{Path(url).name}:{key}"))
        containers.append(url)
    if not rows:
        raise SourceError(f"{urls[0] if urls else 'wds'}: no samples found")
    num_classes = max(r[3] for r in rows) + 1
    if min(r[3] for r in rows) < 0:
        raise SourceError("wds source: negative .cls values; classes must be 0..C-1")
    if num_classes > MAX_WDS_CLASSES:
        seen = len({r[3] for r in rows})
        raise SourceError(f"wds source: a .cls of {num_classes - 1:,} makes {num_classes:,} classes (0..max), "
                          f"{seen:,} of them used; more than {MAX_WDS_CLASSES:,} is refused (every shard record and "
                          "manifest counts every class): remap the labels to 0..C-1 first")
    return _listing("wds", rows, containers, [str(c) for c in range(num_classes)])


def wds_signature(urls: list[str]) -> list:
    return [(str(Path(u).resolve()), Path(u).stat().st_size, Path(u).stat().st_mtime_ns) for u in urls
            if Path(u).is_file()]
