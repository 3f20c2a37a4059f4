"""Random access to the samples of a local tar shard: one header scan, then seeks.

Our shards are plain USTAR written with fixed headers, so one pass over the 512-byte headers (skipping
the data by seeking) indexes a shard in a few milliseconds. With the index a worker reads exactly the
samples it needs and seeks past the others: the shuffle is planned in advance (see ``plan``) instead of
buffering decoded samples, and resuming at a step costs no reading at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

BLOCK = 512
REGULAR = (b"0", b"\0")  # typeflags of regular files; directories and pax headers carry no member


@dataclass
class ShardIndex:
    """Where each sample's members lie in one shard. ``problem`` says why the scan stopped early, if it did."""

    path: str
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # ext -> (offset, size)
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.keys)


def _parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a header block; None at the end-of-archive marker; ValueError if corrupt."""
    if block.count(0) == BLOCK:
        return None
    stored = int(block[148:156].split(b"\0")[0].strip() or b"0", 8)
    if stored != sum(block[:148]) + 8 * 32 + sum(block[156:]):
        raise ValueError("tar header checksum mismatch")
    name = block[:100].split(b"\0")[0].decode("utf-8")
    prefix = block[345:500].split(b"\0")[0].decode("utf-8") if block[257:262] == b"ustar" else ""
    size = int(block[124:136].split(b"\0")[0].strip() or b"0", 8)
    return (f"{prefix}/{name}" if prefix else name), size, block[156:157]


def scan_shard(path: str) -> ShardIndex:
    """Index a shard's samples; a truncated or corrupt tail ends the scan and is recorded in ``problem``."""
    index = ShardIndex(path)
    end = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while True:
            block = f.read(BLOCK)
            if len(block) < BLOCK:
                index.problem = f"truncated at byte {offset} (no end-of-archive marker)"
                break
            try:
                parsed = _parse_header(block)
            except (ValueError, UnicodeDecodeError) as exc:
                index.problem = f"corrupt tar header at byte {offset} ({exc})"
                break
            if parsed is None:
                break
            name, size, kind = parsed
            data_at, offset = offset + BLOCK, offset + BLOCK + size + (-size % BLOCK)
            if data_at + size > end:
                index.problem = f"truncated inside member {name} (needs {data_at + size} bytes, file has {end})"
                break
            f.seek(offset)
            if kind not in REGULAR:
                continue
            key, _, ext = os.path.basename(name).partition(".")
            if not index.keys or index.keys[-1] != key:
                index.keys.append(key)
                index.members.append({})
            index.members[-1][ext] = (data_at, size)
    if index.problem and index.members:
        index.keys.pop()  # the last sample may be missing members that lay beyond the damage
        index.members.pop()
    return index


class ShardReader:
    """Reads samples of one shard by position, keeping the file open for sequential seeks."""

    def __init__(self, path: str):
        self.index = scan_shard(path)
        self.file = open(path, "rb")

    def read(self, position: int) -> tuple[str, dict[str, bytes]]:
        """``(key, {ext: bytes})`` of the sample at ``position``; IndexError when the scan never reached it."""
        if position >= len(self.index):
            raise IndexError(position)
        out = {}
        for ext, (offset, size) in self.index.members[position].items():
            self.file.seek(offset)
            out[ext] = self.file.read(size)
        return self.index.keys[position], out

    def close(self) -> None:
        self.file.close()
