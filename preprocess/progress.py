"""A dependency-free progress bar with rate and ETA, quiet enough for log files."""
from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """``Progress(total, "train")``; ``update(n)`` as work completes; ``close()`` prints the final line.

    On a terminal the bar redraws in place; in a log file it prints a line every ``log_every`` seconds.
    ``note``, if given, is called at each redraw for text to append (e.g. bytes written and projected).
    """

    def __init__(self, total: int, desc: str, unit: str = "img", stream=None, log_every: float = 10.0,
                 enabled: bool = True, note: Callable[[], str] | None = None):
        self.total, self.desc, self.unit, self.note = total, desc, unit, note
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = 0.2 if self.tty else log_every
        self.done = 0
        self.drawn = None  # ``done`` at the last line printed to a log (close() does not repeat that line)
        self.start = self.last = time.perf_counter()

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.interval:
            self.last = now
            self._draw(now)

    def _line(self, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        frac = self.done / self.total if self.total else 1.0
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        note = self.note() if self.note else ""
        return (f"{self.desc} [{bar}] {self.done}/{self.total} {100 * frac:5.1f}% "
                f"{rate_text(rate)} {self.unit}/s elapsed {clock(elapsed)} eta {clock(eta)}" + (f" | {note}" if note else ""))

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        end = "\r" if self.tty else "\n"
        self.stream.write(self._line(now) + end)
        self.stream.flush()
        self.drawn = None if self.tty else self.done

    def close(self) -> float:
        """Print the final line and return the elapsed seconds."""
        now = time.perf_counter()
        if self.enabled and self.drawn != self.done:  # a log already holds this count's line: print it once
            self.stream.write(self._line(now) + "\n")
            self.stream.flush()
        return now - self.start


def rate_text(rate: float) -> str:
    """``6,556`` or ``42`` per second; two significant digits below 10 (an attack at ``0.42`` img/s, not ``0``)."""
    return f"{rate:,.0f}" if rate >= 10 or rate == 0 else f"{rate:.2g}"


def clock(seconds: float) -> str:
    """``h:mm:ss`` (``mm:ss`` under an hour); ``?`` for an unknown (infinite) time."""
    if seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def human_bytes(nbytes: float) -> str:
    """``1.2 TB``, ``61.0 MB``, ``512 B``: decimal units, as disks are sold and ``df -H`` shows them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:,.0f} B"
