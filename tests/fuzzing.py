"""Deterministic corruption for the parsers' property tests: truncations, bit flips and a deadline.

Each parser family has one bounded test built on these (tar reader, sample decoding, manifests, sources,
study files): every corrupted input either reads back as the original (the damage hit padding or a field
nothing reads) or raises the project's error, within a deadline. The campaigns that found the defects these
tests pin (atheris, structure-aware mutation) are not part of the suite.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import signal
from typing import Any, Iterator


class Hang(BaseException):
    """A parser ran past its deadline on one small input (a BaseException: the parsers' own ``except Exception``
    that turns any failure into their error must not turn a hang into a pass)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise ``Hang`` in this (main) thread if the block runs longer than ``seconds``."""
    def expired(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def corruptions(data: bytes, cuts: int = 64, flips: int = 256, span: tuple[int, int] | None = None) -> Iterator[bytes]:
    """``data`` cut at ``cuts`` evenly spaced lengths, then with one bit flipped at ``flips`` evenly spaced bit
    positions of ``span`` (byte range; default the whole of it): deterministic, and bounded whatever the size."""
    for i in range(cuts):
        yield data[:len(data) * i // cuts]
    lo, hi = span or (0, len(data))
    bits = (hi - lo) * 8
    for j in range(flips):
        bit = lo * 8 + bits * j // flips
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        yield bytes(damaged)


def field_paths(doc: Any, depth: int, prefix: tuple = ()) -> Iterator[tuple]:
    """Key paths into parsed JSON or TOML ``doc``: every key, and the first item of every list, ``depth`` levels
    deep."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc[:1]) if isinstance(doc, list) else ()
    for key, value in items:
        yield prefix + (key,)
        if depth > 1:
            yield from field_paths(value, depth - 1, prefix + (key,))


def with_field(doc: Any, path: tuple, value: Any) -> Any:
    """A copy of ``doc`` with the field at ``path`` set to ``value``, or deleted where ``value`` is ``...``."""
    doc = copy.deepcopy(doc)
    where = functools.reduce(lambda d, k: d[k], path[:-1], doc)
    if value is ...:
        del where[path[-1]]
    else:
        where[path[-1]] = value
    return doc
