"""An advisory lock on an output folder, so two runs never interleave shards in one place.

``flock`` locks vanish with their process, so a killed run leaves no stale lock behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import LockedError


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold ``path`` exclusively for the duration of the block, or raise LockedError at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockedError(
                f"{path.parent} is being written by another run (pid {holder}). Wait for it to finish, or "
                "stop it; a killed run releases the lock by itself."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
