"""The one tar reader: one header scan, then random access to members by seeking (never extracting).

Every tar rankshard reads goes through here: its own shards (loaders, ``verify``, ``preview``, RIG input
selection) and foreign archives (existing WebDataset shards, the ImageNet tars, a tar inside a tar). One pass
over the 512-byte headers, seeking past the data, indexes a shard in a few milliseconds; with the index a
worker reads exactly the samples it needs: the shuffle is planned in advance (see ``loaders.plan``) instead
of buffering decoded samples, and resuming at a step costs no reading at all.

Our own shards are fixed USTAR (see ``format.tar``); foreign archives may also use what GNU tar and POSIX
pax write: GNU long names (``L`` members), pax extended headers (``x`` per member, ``g`` global) that carry
long or non-ASCII paths and sizes over 8 GiB, base-256 numbers, the USTAR name prefix, old V7 headers,
signed checksums, directories, links and devices (no data of their own: skipped, as tarfile's ``isfile()``).
Sparse members and multi-volume archives cannot be read in place and are reported.
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.tar import BLOCK
from rankshard.preprocess.format.transport import ShardCache, fetch, is_url

REGULAR = (b"0", b"\0", b"7")  # regular and contiguous files: their data follows the header verbatim
HARDLINK = b"1"  # another name for an earlier member's data (GNU tar stores a file linked twice once)
UNREADABLE = {b"S": "a GNU sparse file", b"M": "a multi-volume continuation"}
# Headers that describe the next member rather than being one: GNU long name / long link, pax local / global.
GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL = b"L", b"K", b"x", b"g"
POSIX_MAGIC = b"ustar\x0000"  # only POSIX headers have a name prefix; old GNU ones keep times at its place


class TarDamage(RankshardError):
    """Where and why a scan had to stop (truncated file, corrupt header, unsupported member); the message
    gives the byte offset, callers put the file's name in front."""


@dataclass(frozen=True)
class TarMember:
    """A regular file member: its full name, and where its data lies in the file (absolute byte offset)."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class _Header:
    name: str
    size: int
    kind: bytes
    link: str = ""  # a hard or symbolic link's target


def _number(field_: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (high bit set) for values octal cannot hold."""
    if field_[:1] and field_[0] & 0x80:
        if field_[0] != 0x80:
            raise ValueError("negative base-256 number")
        return int.from_bytes(field_[1:], "big")
    text = field_.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field_: bytes) -> str:
    # tarfile's default: UTF-8, undecodable bytes kept as surrogates so that names round-trip
    return field_.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_header(block: bytes) -> _Header | None:
    """The header in ``block``; None at the end-of-archive marker; ValueError if corrupt."""
    if block.count(0) == BLOCK:
        return None
    stored = _number(block[148:156])
    unsigned = sum(block[:148]) + 8 * 32 + sum(block[156:])
    # some old tars sum signed chars; counted only when needed (a Python-level pass over 504 bytes per header
    # was a tenth of the loader's time per 224x224 raw sample)
    if stored != unsigned and stored != unsigned - 256 * sum(b >= 128 for b in block[:148] + block[156:]):
        raise ValueError("tar header checksum mismatch")
    name = _text(block[:100])
    if block[257:265] == POSIX_MAGIC and block[345] != 0:
        name = f"{_text(block[345:500])}/{name}"
    kind = block[156:157]
    if kind == b"\0" and name.endswith("/"):
        kind = b"5"  # V7 archives mark directories by a trailing slash only (tarfile's rule)
    return _Header(name, _number(block[124:136]), kind, _text(block[157:257]))


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d key=value\\n"`` records of a pax extended header (the length counts the whole record)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        # a record must cover its own length field and end in a newline inside the data: a hostile length
        # (0, negative, too short, past the end) would otherwise loop forever or read past the header
        if length <= space - pos + 1 or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise ValueError(f"pax record at {pos} has a bad length {length}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class _Scan:
    """Reads the headers of the tar at ``start`` (``size`` bytes) of a blob, following extension headers."""

    def __init__(self, blob: "Blob", start: int, size: int):
        self.blob, self.start, self.end = blob, start, start + size
        self.pos = start  # next header, absolute
        self.pax_global: dict[str, str] = {}

    def _read(self, at: int, n: int) -> bytes:
        data = self.blob.pread(n, at) if at + n <= self.end else b""
        if len(data) < n:
            raise TarDamage(f"truncated at byte {at - self.start} (needs {at - self.start + n} bytes, the tar has "
                            f"{self.end - self.start}; no end-of-archive marker)")
        return data

    def _header(self) -> _Header | None:
        try:
            return _parse_header(self._read(self.pos, BLOCK))
        except (ValueError, IndexError) as exc:
            raise TarDamage(f"corrupt tar header at byte {self.pos - self.start} ({exc})") from None

    def _skip(self, header: _Header) -> int:
        """Move past ``header`` and its data; returns the data's absolute offset."""
        data_at = self.pos + BLOCK
        if header.size < 0:  # octal "-1000" or pax size=-512 would step back onto this header: a scan that never ends
            raise TarDamage(f"corrupt tar header at byte {self.pos - self.start} (member {header.name} has a negative "
                            f"size, {header.size})")
        if data_at + header.size > self.end:
            raise TarDamage(f"truncated inside member {header.name} (needs {data_at + header.size - self.start} "
                            f"bytes, the tar has {self.end - self.start})")
        self.pos = data_at + header.size + (-header.size % BLOCK)
        return data_at

    def members(self) -> Iterator[TarMember]:
        """Every regular file member, in archive order; a hard link to an earlier one as a member of its own."""
        local: dict[str, str] = {}
        stored: dict[str, tuple[int, int]] = {}  # regular member name -> (data offset, size)
        while (header := self._header()) is not None:
            if header.kind in (GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL):
                self._extension(header, self._skip(header), local)
                continue
            pax = {**self.pax_global, **local}
            local = {}
            try:  # pax values replace the header's: long or non-ASCII paths, sizes of 8 GiB and more
                header = _Header(pax.get("path", header.name), int(pax.get("size", header.size)), header.kind,
                                 pax.get("linkpath", header.link))
            except ValueError:
                raise TarDamage(f"member {header.name}: pax size {pax['size']!r} is not a number") from None
            if header.kind in UNREADABLE:
                raise TarDamage(f"member {header.name} is {UNREADABLE[header.kind]}, which cannot be read in place; "
                                "re-create the archive without sparse files or volumes")
            data_at = self._skip(header)
            if header.kind in REGULAR:
                stored[header.name] = (data_at, header.size)
                yield TarMember(header.name, data_at, header.size)
            elif header.kind == HARDLINK and header.link in stored:
                yield TarMember(header.name, *stored[header.link])

    def _extension(self, header: _Header, data_at: int, local: dict[str, str]) -> None:
        data = self._read(data_at, header.size)
        try:
            if header.kind == GNU_LONGNAME:
                local["path"] = _text(data)
            elif header.kind == GNU_LONGLINK:
                local["linkpath"] = _text(data)
            elif header.kind == PAX_LOCAL:
                local.update(_pax_records(data))
            elif header.kind == PAX_GLOBAL:
                self.pax_global.update(_pax_records(data))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TarDamage(f"corrupt extended header at byte {data_at - BLOCK - self.start} ({exc})") from None


class Blob(abc.ABC):
    """Random access to a shard's bytes: ``pread(n, at)`` and ``size``. The scan and the reader see only this,
    so a local file (seeks) and a downloaded remote shard (bytes in memory) are read by the same code."""

    size: int

    @abc.abstractmethod
    def pread(self, n: int, at: int) -> bytes:
        """``n`` bytes at offset ``at`` (fewer at the end)."""

    def close(self) -> None:
        pass


class FileBlob(Blob):
    def __init__(self, f: BinaryIO, owned: bool = False):
        self.file, self.owned = f, owned
        self.fd = f.fileno()
        self.size = os.fstat(self.fd).st_size

    def pread(self, n: int, at: int) -> bytes:
        return os.pread(self.fd, n, at)

    def close(self) -> None:
        if self.owned:
            self.file.close()


class BytesBlob(Blob):
    def __init__(self, data: bytes):
        self.data, self.size = memoryview(data), len(data)

    def pread(self, n: int, at: int) -> bytes:
        return bytes(self.data[at:at + n])


def iter_tar(f: BinaryIO | Blob, start: int = 0, size: int | None = None) -> Iterator[TarMember]:
    """Regular file members of the uncompressed tar at byte ``start`` of the open file (or blob) ``f``
    (``size`` bytes; default: to the end), e.g. a tar stored inside another tar. ``TarDamage`` where it breaks."""
    blob = f if isinstance(f, Blob) else FileBlob(f)
    size = blob.size - start if size is None else size
    return _Scan(blob, start, size).members()


def split_name(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member name: the extension starts at the first dot of the
    basename; the key keeps the folder (``a/b.x.png`` -> ``("a/b", "x.png")``)."""
    folder, base = os.path.split(name)
    key, _, ext = base.partition(".")
    return (f"{folder}/{key}" if folder else key), ext


@dataclass
class ShardIndex:
    """Where each sample's members lie in one shard. ``problem`` says why the scan stopped early, if it did."""

    path: str
    keys: list[str] = field(default_factory=list)
    members: list[dict[str, tuple[int, int]]] = field(default_factory=list)  # ext -> (offset, size)
    problem: str | None = None

    def __len__(self) -> int:
        return len(self.keys)


def open_blob(url: str | os.PathLike, sha256: str | None = None, nbytes: int | None = None,
              cache: ShardCache | None = None) -> Blob:
    """A shard by path or URL: a local file is opened for seeking; a remote one is fetched whole and verified
    against ``nbytes``/``sha256`` (see ``transport``), into ``cache`` when given, else into memory."""
    if not is_url(url):
        path = str(url)[len("file://"):] if str(url).startswith("file://") else url
        return FileBlob(open(path, "rb"), owned=True)
    if cache is not None:
        return FileBlob(cache.open(str(url), sha256, nbytes), owned=True)
    return BytesBlob(fetch(str(url), sha256, nbytes))


def _index(blob: Blob, name: str) -> ShardIndex:
    index = ShardIndex(name)
    try:
        for member in iter_tar(blob):
            key, ext = split_name(member.name)
            if not index.keys or index.keys[-1] != key:
                index.keys.append(key)
                index.members.append({})
            index.members[-1][ext] = (member.offset, member.size)
    except TarDamage as exc:
        index.problem = str(exc)
    if index.problem and index.members:
        index.keys.pop()  # the last sample may be missing members that lay beyond the damage
        index.members.pop()
    return index


def scan_shard(path: str | os.PathLike) -> ShardIndex:
    """Index a shard's samples (members grouped by key, in order); a truncated or corrupt tail ends the scan
    and is recorded in ``problem``, keeping the samples before it. ``path`` may be a URL (fetched whole)."""
    blob = open_blob(path)
    try:
        return _index(blob, str(path))
    finally:
        blob.close()


class ShardReader:
    """Reads samples of one shard by position, keeping it open (a local file for seeks, or a remote shard
    fetched once and checked against the manifest's ``sha256``/``nbytes``; see ``open_blob``)."""

    def __init__(self, path: str | os.PathLike, sha256: str | None = None, nbytes: int | None = None,
                 cache: ShardCache | None = None):
        self.blob = open_blob(path, sha256, nbytes, cache)
        try:
            self.index = _index(self.blob, str(path))
        except BaseException:
            self.blob.close()
            raise

    def read(self, position: int) -> tuple[str, dict[str, bytes]]:
        """``(key, {ext: bytes})`` of the sample at ``position``; IndexError when the scan never reached it."""
        if position >= len(self.index):
            raise IndexError(position)
        out = {}
        for ext, (offset, size) in self.index.members[position].items():
            out[ext] = self.blob.pread(size, offset)
        return self.index.keys[position], out

    def close(self) -> None:
        self.blob.close()


def read_shard(path: str | os.PathLike, sha256: str | None = None,
               nbytes: int | None = None) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of a whole shard (a path or URL) as ``(key, {extension: bytes})``; RankshardError if it is
    damaged or a sample's members are not contiguous. A URL is fetched checked against ``sha256``/``nbytes``
    (the manifest's), where given."""
    try:
        reader = ShardReader(path, sha256, nbytes)
    except OSError as exc:  # a shard listed but gone, or unreadable here (a remote one's failures are TransportErrors)
        raise RankshardError(f"{path}: cannot be read ({exc.strerror or exc}); rerun the preprocess command to "
                             "rewrite it, or check all shards with `rankshard-preprocess verify`") from None
    try:
        if reader.index.problem:
            raise RankshardError(f"{path}: {reader.index.problem}; rewrite it (delete it and rerun the preprocess "
                                 "command) or check all shards with `rankshard-preprocess verify`")
        seen: set[str] = set()  # one pass: scanning the keys before each one took minutes on a large tar
        again = next((k for k in reader.index.keys if k in seen or seen.add(k)), None)
        if again is not None:
            raise RankshardError(f"{path}: members of sample {again} are not contiguous")
        return [reader.read(i) for i in range(len(reader.index))]
    finally:
        reader.close()
