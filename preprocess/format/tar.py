"""Deterministic, atomic WebDataset shard writing.

A shard is a USTAR tar whose members are grouped by sample key, in sorted extension order, with fixed
mtime/uid/gid/mode, so the same samples always give the same bytes. It is written under a hidden
temporary name and renamed only when complete: a file with a shard's name is always a whole shard.
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from rankshard.preprocess.errors import DiskFullError, RankshardError

MTIME = 0  # fixed member timestamp: determinism beats a meaningless "now"
MODE = 0o644


@dataclass(frozen=True)
class ShardRecord:
    """What the manifest needs to know about one finished shard."""

    name: str
    num_samples: int
    bytes: int
    sha256: str


def partial_name(path: Path) -> Path:
    """The hidden temporary name a shard is written under (never matched by ``*.tar`` globs)."""
    return path.with_name(f".{path.name}.partial")


BLOCK = 512
RECORD = 20 * BLOCK  # tar archives end on a 10 KiB record boundary (what tarfile and GNU tar write)


def ustar_header(name: str, size: int) -> bytes:
    """A USTAR header for a regular file with the fixed mode, owner and mtime of every shard member.

    Written by hand because tarfile spends ~60 us per header, which dominated small-image shards.
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"member name {name!r} is longer than the 100 bytes a USTAR name holds")
    fields = [
        raw.ljust(100, b"\0"), b"%07o\0" % MODE, b"%07o\0" % 0, b"%07o\0" % 0,
        b"%011o\0" % size, b"%011o\0" % MTIME, b" " * 8, b"0", b"\0" * 100,
        b"ustar\x0000", b"\0" * 32, b"\0" * 32, b"%07o\0" % 0, b"%07o\0" % 0, b"\0" * 155,
    ]
    header = b"".join(fields).ljust(BLOCK, b"\0")
    checksum = b"%06o\0 " % sum(header)
    return header[:148] + checksum + header[156:]


def _member_bytes(name: str, data: bytes) -> bytes:
    return ustar_header(name, len(data)) + data + b"\0" * (-len(data) % BLOCK)


def write_shard(path: str | os.PathLike, samples: Iterable[tuple[str, Mapping[str, bytes]]]) -> ShardRecord:
    """Write ``(key, {extension: bytes})`` samples to ``path`` atomically and return its record.

    On any failure (a full disk included) the temporary file is removed and nothing is left under
    ``path``; an existing complete shard is only ever replaced by another complete one.
    """
    path = Path(path)
    tmp = partial_name(path)
    count = 0
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingWriter(raw)
            for key, members in samples:
                _check_key(key)
                hashing.write(b"".join(_member_bytes(f"{key}.{ext}", members[ext]) for ext in sorted(members)))
                count += 1
            hashing.write(b"\0" * (2 * BLOCK))  # end-of-archive marker
            hashing.write(b"\0" * (-hashing.size % RECORD))
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"{path}: the disk is full ({exc.strerror}). Nothing partial was kept; free space "
                "(or pass another --out) and rerun the same command to resume."
            ) from exc
        if isinstance(exc, PermissionError):
            raise RankshardError(f"{path.parent}: not writable ({exc.strerror}); choose another --out.") from exc
        raise
    return ShardRecord(path.name, count, hashing.size, hashing.sha256.hexdigest())


def _check_key(key: str) -> None:
    # WebDataset splits a member name at the first dot of its basename: a dot in a key would corrupt it.
    if not key or "." in key or "/" in key:
        raise ValueError(f"invalid sample key {key!r}: keys must be non-empty and contain no '.' or '/'")


class _HashingWriter:
    """Hashes and counts what passes through to the real file."""

    def __init__(self, raw):
        self.raw, self.size, self.sha256 = raw, 0, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)
    return h.hexdigest()
