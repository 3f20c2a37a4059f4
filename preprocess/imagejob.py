"""Running the materialization of an image dataset (ImageNet, ImageFolder, WebDataset shards).

Builds the cached listing, the geometry and the torchrun placement, then hands over to the pipeline.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rankshard.preprocess.devices import Placement
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.transport import is_url
from rankshard.preprocess.sources.images import Geometry
from rankshard.preprocess.sources.listing import FileSource, Listing, cached_listing, source_info
from rankshard.preprocess.pipeline import materialize_split
from rankshard.preprocess.spec import ShardSpec

# torchvision's evaluation geometry for val (Resize 256, CenterCrop 224); train images are stored at the
# 224 x 224 the network sees, so that rank k means the same thing in training and evaluation.
DEFAULT_GEOMETRY = {"train": (224, 224), "val": (256, 224)}


def default_geometry(split: str, resize: int | None, crop: int | None, max_pixels: int | None = None,
                     exif_transpose: bool = False) -> Geometry:
    """Geometry from --resize/--crop, with the split's defaults for whatever was not given."""
    base_resize, base_crop = DEFAULT_GEOMETRY.get(split, DEFAULT_GEOMETRY["val"])
    # "is None", not "or": a given 0 must reach Geometry's validation, not quietly become the default
    crop = base_crop if crop is None else crop
    resize = max(base_resize, crop) if resize is None else resize
    try:
        return Geometry(resize, crop, exif_transpose=exif_transpose,
                        **({} if max_pixels is None else {"max_pixels": max_pixels}))
    except ValueError as exc:
        raise RankshardError(str(exc)) from None


def cache_dir(out: Path | str, dataset: str, split: str) -> Path:
    if is_url(out):  # object storage: the listing cache stays on this machine
        digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rankshard" / digest / dataset / split
    return Path(out) / dataset / split / ".listing"


def md5_cached(folder: Path, compute: Callable[[Path], str]) -> Callable[[Path], str]:
    """``compute`` (an md5 of a 140 GB archive takes minutes) remembered per (path, size, mtime) in ``folder``."""
    def md5_of(path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        store = folder / "md5.json"
        known = json.loads(store.read_text()) if store.exists() else {}
        if key not in known:
            known[key] = compute(path)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = store.with_name(f".md5.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known, indent=1))
            os.replace(tmp, store)
        return known[key]
    return md5_of


def file_source(listing_fn: Callable[[], Listing], signature: dict, root: Path, geometry: Geometry,
                cache: Path | None, checksum_verified: bool = False) -> FileSource:
    """A FileSource over the cached (or freshly built) listing."""
    start = time.perf_counter()
    listing, cached = cached_listing(cache, signature, listing_fn)
    info = source_info(listing, root, checksum_verified, cached, time.perf_counter() - start)
    # the geometry decides every pixel (and, through the size rules, which files are skipped): it is part
    # of what identifies the output, so another --crop in the same folder is refused instead of resumed
    info["geometry"] = asdict(geometry)
    return FileSource(listing, geometry, info)


def imagenet_source(source: Path, split: str, geometry: Geometry, cache: Path | None, devkit: Path | None = None,
                    verify_md5: bool = False) -> FileSource:
    """ILSVRC2012 ``split`` from any supported layout under ``source``."""
    from rankshard.preprocess.sources.imagenet import detect, list_imagenet, signature, verify_archives
    from rankshard.preprocess.sources.folders import file_md5

    found = detect(source, split, devkit)
    verified = verify_md5 and verify_archives(found, md5_cached(cache, file_md5) if cache else file_md5)
    return file_source(lambda: list_imagenet(found), signature(found), found.path, geometry, cache, bool(verified))


def folder_source(root: Path, geometry: Geometry, cache: Path | None) -> FileSource:
    """Any ``root/<class>/<image>`` tree (ImageFolder convention)."""
    from rankshard.preprocess.sources.folders import class_dirs, folder_signature, list_folder

    sig = {"kind": "folder", "tree": folder_signature(root, class_dirs(root))}
    return file_source(lambda: list_folder(root), sig, root, geometry, cache)


def wds_source(pattern: str, geometry: Geometry, cache: Path | None) -> FileSource:
    """Existing WebDataset shards (``jpg``/``png``/``webp`` + ``cls``), brace-expanded."""
    from rankshard.preprocess.sources.folders import expand_urls, list_wds, wds_signature

    urls = expand_urls(pattern)
    return file_source(lambda: list_wds(urls), {"kind": "wds", "urls": wds_signature(urls)}, Path(pattern),
                       geometry, cache)


def run_image_job(source: FileSource, spec: ShardSpec, out: Path, overwrite: bool = False, on_error: str = "skip",
                  placement: Placement = Placement(), show_progress: bool = True, space_check: bool = True) -> dict:
    """Materialize this process's share; the manifests come back once every shard exists."""
    return materialize_split(source, spec, out, overwrite=overwrite, show_progress=show_progress, on_error=on_error,
                             rank=placement.rank, world=placement.world, space_check=space_check)
