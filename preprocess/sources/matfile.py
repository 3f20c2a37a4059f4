"""A small reader for MATLAB level-5 MAT files (what the ILSVRC2012 devkit's ``meta.mat`` is), no scipy.

It reads numeric arrays, char arrays, cell arrays and struct arrays, compressed (``-v7``) or not, which
is all ``meta.mat`` holds. Layout reference: MathWorks, "MAT-File Format" (level 5), sections 1-3.
Arrays come back column-major flattened into Python lists of elements, with their ``dims``.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from rankshard.preprocess.errors import SourceError

MI_MATRIX, MI_COMPRESSED = 14, 15
MAX_INFLATED = 64 << 20  # the devkit's meta.mat inflates to ~0.3 MB: anything past this is refused, not held
# data element types -> numpy dtypes (little-endian; the file's endianness is applied on read)
_MI_DTYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8",
              16: "u1", 17: "u2", 18: "u4"}
_MX_CELL, _MX_STRUCT, _MX_CHAR = 1, 2, 4
_TEXT_TYPES = {16: "utf-8", 17: "utf-16", 18: "utf-32"}


@dataclass
class MatArray:
    """One MATLAB array: class id, dims, and the elements column-major (numbers, strings, dicts, arrays)."""

    mclass: int
    dims: tuple[int, ...]
    data: object = None
    fields: list[str] = field(default_factory=list)

    def scalar(self):
        """The single value of a 1x1 numeric or the string of a char array."""
        if isinstance(self.data, str):
            return self.data
        values = np.asarray(self.data).ravel()
        return values[0].item() if len(values) else None


class _Reader:
    def __init__(self, data: bytes, order: str, what: str, budget: list[int] | None = None):
        self.data, self.order, self.what = data, order, what
        # what the file's compressed elements may still inflate to, shared with the readers of nested ones: an
        # element of small compressed elements (each under the cap) held gigabytes from a 5 kB file
        self.budget = [MAX_INFLATED] if budget is None else budget

    def fail(self, message: str):
        raise SourceError(f"{self.what}: not a readable MAT-file ({message})")

    def tag(self, pos: int) -> tuple[int, int, int, int]:
        """(type, nbytes, data start, next element) of the element at ``pos``, small format included."""
        if pos + 8 > len(self.data):
            self.fail(f"element header past the end at byte {pos}")
        first, second = struct.unpack_from(self.order + "II", self.data, pos)
        if first >> 16:  # small data element: 2-byte size, 2-byte type, data in the same 8 bytes
            return first & 0xFFFF, first >> 16, pos + 4, pos + 8
        start = pos + 8
        end = start + second
        if first != MI_COMPRESSED:  # everything but compressed elements is padded to 8 bytes
            end += -second % 8
        return first, second, start, end

    def numeric(self, pos: int) -> tuple[np.ndarray, int, int]:
        mtype, nbytes, start, end = self.tag(pos)
        if mtype not in _MI_DTYPES:
            self.fail(f"unexpected data type {mtype} at byte {pos}")
        dtype = np.dtype(_MI_DTYPES[mtype]).newbyteorder(self.order)
        return np.frombuffer(self.data, dtype, nbytes // dtype.itemsize, start), mtype, end


def _element(reader: _Reader, pos: int) -> tuple[str | None, MatArray | None, int]:
    """Decode the top-level or nested element at ``pos``: (name, array, next position)."""
    mtype, nbytes, start, end = reader.tag(pos)
    if mtype == MI_COMPRESSED:
        left = reader.budget[0]
        try:
            unpacker = zlib.decompressobj()
            inner = unpacker.decompress(reader.data[start:start + nbytes], max(left, 1))  # 0 would be no limit
        except zlib.error as exc:
            reader.fail(f"bad compressed element: {exc}")
        if unpacker.unconsumed_tail or len(inner) > left:  # more than any devkit holds: a zip bomb, not metadata
            reader.fail(f"a compressed element inflates to more than {MAX_INFLATED:,} bytes (all of them together)")
        if not unpacker.eof:  # zlib.decompress raised on this; a decompressobj just stops
            reader.fail("a compressed element is truncated")
        reader.budget[0] -= len(inner)
        name, array, _ = _element(_Reader(inner, reader.order, reader.what, reader.budget), 0)
        return name, array, end
    if mtype != MI_MATRIX:
        return None, None, end
    if nbytes == 0:  # an empty cell or struct field
        return "", MatArray(_MX_CELL, (0, 0), []), end
    name, array = _matrix(reader, start)
    return name, array, end


def _matrix(reader: _Reader, pos: int) -> tuple[str, MatArray]:
    flags, _, pos = reader.numeric(pos)
    mclass = int(flags[0]) & 0xFF
    dims, _, pos = reader.numeric(pos)
    raw_name, _, pos = reader.numeric(pos)
    name = bytes(raw_name.astype(np.uint8)).decode("ascii", errors="replace")
    array = MatArray(mclass, tuple(int(d) for d in dims))
    count = int(np.prod(array.dims)) if len(array.dims) else 0
    if mclass == _MX_CELL:
        array.data = []
        for _ in range(count):
            _, item, pos = _element(reader, pos)
            array.data.append(item)
    elif mclass == _MX_STRUCT:
        array.fields, array.data = _struct(reader, pos, count)
    elif mclass == _MX_CHAR:
        chars, mtype, _ = reader.numeric(pos)
        text = bytes(chars.astype(np.uint8)).decode() if mtype in (1, 2, 16) else \
            "".join(map(chr, chars.astype(np.uint32)))
        array.data = _char_rows(text, array.dims)
    else:
        array.data, _, _ = reader.numeric(pos)  # real part; meta.mat has no complex arrays
    return name, array


def _struct(reader: _Reader, pos: int, count: int) -> tuple[list[str], list[dict]]:
    if count > len(reader.data):  # a field takes 8 bytes or more: dims that lie (a struct without fields looped on)
        reader.fail(f"a struct array of {count:,} elements in {len(reader.data):,} bytes")
    name_len_arr, _, pos = reader.numeric(pos)
    name_len = int(name_len_arr[0])
    raw, _, pos = reader.numeric(pos)
    blob = bytes(raw.astype(np.uint8))
    names = [blob[i:i + name_len].split(b"\0")[0].decode() for i in range(0, len(blob), name_len)]
    records = []
    for _ in range(count):
        record = {}
        for fname in names:
            _, value, pos = _element(reader, pos)
            record[fname] = value
        records.append(record)
    return names, records


def _char_rows(text: str, dims: tuple[int, ...]) -> str:
    """A char matrix is stored column-major: read it back row by row, rows joined by newlines."""
    if len(dims) != 2 or dims[0] <= 1 or not text:
        return text
    rows, cols = dims
    if rows * cols != len(text):  # dims (83886336, 0) built 84 million empty rows from 5 characters
        raise ValueError(f"a {rows}x{cols} char array holds {len(text)} characters")
    return "\n".join(text[r::rows] for r in range(rows))


def read_mat(data: bytes, what: str = "MAT-file") -> dict[str, MatArray]:
    """All named top-level variables of a level-5 MAT file given as bytes."""
    if len(data) < 128 or data[124:126] not in (b"\x00\x01", b"\x01\x00"):
        raise SourceError(f"{what}: not a level-5 MAT-file (MATLAB -v7.3/HDF5 files are not supported; "
                          "re-save with -v7)")
    order = "<" if data[126:128] == b"IM" else ">"
    reader = _Reader(data, order, what)
    out, pos = {}, 128
    try:
        while pos < len(data):
            name, array, pos = _element(reader, pos)
            if name:
                out[name] = array
    except SourceError:
        raise
    except Exception as exc:  # sizes and counts that lie make numpy, struct, str and recursion fail in many ways
        raise SourceError(f"{what}: not a readable MAT-file, damaged ({type(exc).__name__}: {exc}); use the file "
                          "from the original archive") from None
    return out
