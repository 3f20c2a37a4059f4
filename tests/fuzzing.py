"""Deterministic corruption for the parsers' property tests: truncations, bit flips and a deadline.

Each parser family has one bounded test built on these (tar reader, sample decoding, manifests, sources,
study files): every corrupted input either reads back as the original (the damage hit padding or a field
nothing reads) or raises the project's error, within a deadline. The campaigns that found the defects these
tests pin (atheris, structure-aware mutation) are not part of the suite.
"""
from __future__ import annotations

import contextlib
import signal
from typing import Iterator


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
