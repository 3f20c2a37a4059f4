"""The file listing of an image dataset, its on-disk cache, and the Source that decodes it in workers.

A listing says, for every image in source order, where its bytes are: a container file (a plain image
file, or a tar read in place), a byte offset and a size, plus its label and a readable id. Any worker can
then read image ``i`` with one ``pread``, without extracting or re-scanning archives. Listing 1.28M files
(or tar headers) takes minutes, so it is built once and cached as ``.npz`` keyed by a cheap signature of
the source (paths, sizes, mtimes of the archives or class folders).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from rankshard.preprocess.errors import RankshardError, SourceError
from rankshard.preprocess.sources.images import BadImage, Geometry, decode

# 2: listings record the folders below the class level they read (``watch``); a version-1 cache of a nested
# tree could be stale, so it is rebuilt once
LISTING_VERSION = 2


@dataclass
class Listing:
    """Where each image of a split is: container path, byte offset, size (-1: whole file), label, id."""

    containers: list[str]
    container: np.ndarray          # int32 [N]: index into containers
    offset: np.ndarray             # int64 [N]
    size: np.ndarray               # int64 [N]
    label: np.ndarray              # int64 [N]
    ids: list[str]                 # e.g. "train/n01440764/n01440764_10026.JPEG"
    classes: tuple[str, ...]       # class identities in index order (wnids, folder names)
    class_names: tuple[str, ...]   # readable names in index order (= classes when none are known)
    kind: str
    extra: dict = field(default_factory=dict)   # layout details for the manifest (label source, ...)
    # (path, mtime_ns) of the folders read below the level the cache signature covers (nested folders of a
    # class): adding or removing a file there changes only their mtime, so a cached listing checks them
    watch: tuple = ()

    def __len__(self) -> int:
        return len(self.ids)

    def fingerprint(self) -> str:
        """sha256 of what identifies the images: ids, sizes, labels and classes (not file contents:
        hashing 140 GB per run is not affordable; --verify-md5 checks the archives themselves)."""
        h = hashlib.sha256(json.dumps([self.kind, list(self.classes)]).encode())
        h.update("\n".join(self.ids).encode())
        h.update(np.ascontiguousarray(self.size, dtype="<i8").tobytes())
        h.update(np.ascontiguousarray(self.label, dtype="<i8").tobytes())
        return h.hexdigest()

    def is_current(self) -> bool:
        """Whether every watched folder is unchanged (a stat each; ImageNet's flat class folders have none)."""
        try:
            return all(os.stat(path).st_mtime_ns == mtime for path, mtime in self.watch)
        except OSError:  # a watched folder vanished
            return False

    def entry(self, i: int) -> tuple[str, int, int]:
        return self.containers[int(self.container[i])], int(self.offset[i]), int(self.size[i])


def _blob(strings) -> np.ndarray:
    # one newline-joined utf-8 blob loads ~50x faster than an object array of 1.28M strings
    return np.frombuffer("\n".join(strings).encode(), dtype=np.uint8)


def _unblob(array: np.ndarray) -> list[str]:
    text = array.tobytes().decode()
    return text.split("\n") if text else []


def save_listing(listing: Listing, path: Path) -> None:
    """Write the listing atomically (a concurrent reader sees the old file or the new one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"kind": listing.kind, "extra": listing.extra, "version": LISTING_VERSION, "watch": listing.watch}
    with open(tmp, "wb") as f:
        np.savez(f, containers=_blob(listing.containers), container=listing.container, offset=listing.offset,
                 size=listing.size, label=listing.label, ids=_blob(listing.ids), classes=_blob(listing.classes),
                 class_names=_blob(listing.class_names), meta=_blob([json.dumps(meta)]))
    os.replace(tmp, path)


def load_listing(path: Path) -> Listing | None:
    """The cached listing at ``path``, or None when absent, unreadable or of another version."""
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("version") != LISTING_VERSION:
                return None
            return Listing(_unblob(z["containers"]), z["container"], z["offset"], z["size"], z["label"],
                           _unblob(z["ids"]), tuple(_unblob(z["classes"])), tuple(_unblob(z["class_names"])),
                           meta["kind"], meta["extra"], tuple(tuple(w) for w in meta["watch"]))
    except (OSError, ValueError, KeyError):
        return None


def cached_listing(cache_dir: Path | None, signature: dict, build: Callable[[], Listing]) -> tuple[Listing, bool]:
    """The listing for ``signature`` from ``cache_dir``, building and caching it on a miss.

    A blocking lock per signature means that when several ranks start together one builds the listing
    and the others wait and read it. Returns (listing, was_cached).
    """
    if cache_dir is None:
        return build(), False
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RankshardError(f"{cache_dir}: cannot create the output folder ({exc.strerror}); choose another "
                             "--out or fix its permissions") from exc
    key = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_dir / f"listing-{key}.npz"
    fd = os.open(cache_dir / f".listing-{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        listing = load_listing(path) if path.exists() else None
        if listing is not None and listing.is_current():
            return listing, True
        listing = build()
        save_listing(listing, path)
        return listing, False
    finally:
        os.close(fd)


def read_bytes(container: str, offset: int, size: int, max_bytes: int | None = None) -> bytes:
    """The bytes of one listed image: a whole file (size -1) or ``size`` bytes at ``offset`` of a tar.

    A file or member over ``max_bytes`` is refused before it is read (BadImage), so a 40 GB "image"
    never reaches memory.
    """
    with open(container, "rb") as f:
        if max_bytes is not None:
            actual = os.fstat(f.fileno()).st_size if size < 0 else size
            if actual > max_bytes:
                raise BadImage(f"file of {actual:,} bytes refused before reading: no image within --max-pixels "
                               f"needs more than {max_bytes:,} bytes")
        if size < 0:
            return f.read()
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise BadImage(f"{container} ends before byte {offset + size} (archive truncated?)")
    return data


# -- decoding in workers ----------------------------------------------------------------------------


@dataclass
class Loaded:
    """A decoded chunk: the good images (in order) and what happened to the bad ones."""

    images: np.ndarray             # uint8 [m, H, W, 3]
    labels: np.ndarray             # int64 [m]
    ids: list[str]
    keep: np.ndarray               # bool [n]: which requested entries decoded
    errors: list[dict]             # {"index", "source", "reason"} for the others
    seconds: float = 0.0           # read + decode time where it ran (a worker, or this process)


@dataclass
class DecodeJob:
    """Picklable work for one chunk: entries to read and decode, with their output positions."""

    entries: list[tuple[str, int, int]]
    positions: list[int]
    labels: list[int]
    ids: list[str]
    geometry: Geometry

    def run(self) -> Loaded:
        start = time.perf_counter()
        c = self.geometry.crop
        images = np.empty((len(self.entries), c, c, 3), dtype=np.uint8)
        keep = np.zeros(len(self.entries), dtype=bool)
        errors = []
        for j, (entry, position, source_id) in enumerate(zip(self.entries, self.positions, self.ids)):
            try:
                images[j] = decode(read_bytes(*entry, max_bytes=self.geometry.max_file_bytes), self.geometry)
                keep[j] = True
            except BadImage as exc:
                errors.append({"index": position, "source": source_id, "reason": str(exc)})
            except OSError as exc:  # unreadable file: permissions, vanished, I/O error
                errors.append({"index": position, "source": source_id, "reason": f"unreadable ({exc})"})
        return Loaded(images[keep], np.asarray(self.labels, dtype=np.int64)[keep],
                      [i for i, k in zip(self.ids, keep) if k], keep, errors, time.perf_counter() - start)


def run_job(job) -> Loaded:
    """Pool entry point (module level, so spawn workers can import it)."""
    return job.run()


@dataclass
class FileSource:
    """A Source over a Listing: images are read and decoded by ``DecodeJob`` in worker processes."""

    listing: Listing
    geometry: Geometry
    info: dict
    decode_in_workers: bool = True

    @property
    def classes(self) -> tuple[str, ...]:
        return self.listing.classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.listing.class_names

    @property
    def image_size(self) -> tuple[int, int]:
        return self.geometry.crop, self.geometry.crop

    def __len__(self) -> int:
        return len(self.listing)

    def load_job(self, indices: np.ndarray, positions: np.ndarray) -> DecodeJob:
        """The job decoding source images ``indices`` that go to output ``positions``."""
        ls = self.listing
        return DecodeJob([ls.entry(i) for i in indices], [int(p) for p in positions],
                         [int(ls.label[i]) for i in indices], [ls.ids[i] for i in indices], self.geometry)

    def load(self, indices: np.ndarray):
        """Decode in this process (all entries must be good): images, labels, ids."""
        loaded = self.load_job(indices, indices).run()
        if loaded.errors:
            raise SourceError(f"{loaded.errors[0]['source']}: {loaded.errors[0]['reason']}")
        return loaded.images, loaded.labels, loaded.ids


def source_info(listing: Listing, root: Path, checksum_verified: bool, cached: bool, seconds: float) -> dict:
    """The manifest's ``source`` entry for a listing."""
    return {"kind": listing.kind, "path": str(root), "fingerprint": listing.fingerprint(),
            "checksum_verified": checksum_verified, "num_files": len(listing), "listing_cached": cached,
            "listing_seconds": round(seconds, 3), "class_names": list(listing.class_names), **listing.extra}
