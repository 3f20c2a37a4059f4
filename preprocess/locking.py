"""An advisory lock on an output folder, so two runs never interleave shards in one place.

``flock`` locks vanish with their process, so a killed run leaves no stale lock behind.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from rankshard.preprocess.errors import LockedError, RankshardError

NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # NFS without lockd, Lustre without -o flock


def flock(fd: int, flags: int, folder: Path, way_out: str = "choose an --out folder on a local disk") -> None:
    """``fcntl.flock``; a filesystem that refuses file locks is a RankshardError naming it and ``way_out``
    (BlockingIOError, a lock held elsewhere, is the caller's)."""
    try:
        fcntl.flock(fd, flags)
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise
        raise RankshardError(f"{folder}: its filesystem refuses file locks ({exc.strerror}), which keep two runs "
                             f"from writing one place at once; {way_out}, or mount it with locks (NFS: lockd; "
                             "Lustre: -o flock)") from None


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Hold ``path`` exclusively for the duration of the block, or raise LockedError at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path.parent)
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


def group_id(rank: int, world: int) -> str:
    """What identifies the processes of one run: torchrun's rendezvous (run id, master, world size).

    A single-process run is its own group (its pid), so two independent runs never share a folder.
    """
    if world == 1:
        return f"single:{socket.gethostname()}:{os.getpid()}"
    env = os.environ
    run = env.get("RANKSHARD_RUN_ID") or env.get("TORCHELASTIC_RUN_ID", "")
    return f"world{world}:{run}:{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


class RunLock:
    """Lets the ranks of ONE run share an output folder and refuses any other run.

    Every member holds a shared ``flock`` on ``.lock`` and an exclusive one on ``.lock.rank-R``; the first
    member to arrive (it gets ``.lock`` exclusively: nobody else holds it) records its group id in
    ``.lock.group``. Arrivals are serialized by ``.lock.gate``, which also guards setup and finalization
    (``with lock.gate(): ...``). Like ``exclusive_lock``, everything vanishes with the processes.
    """

    def __init__(self, folder: Path, rank: int = 0, world: int = 1):
        self.folder, self.rank, self.world = Path(folder), rank, world
        self.group = group_id(rank, world)
        self._fds: list[int] = []

    def _open(self, name: str) -> int:
        fd = os.open(self.folder / name, os.O_RDWR | os.O_CREAT, 0o644)
        self._fds.append(fd)
        return fd

    @contextlib.contextmanager
    def gate(self):
        """Serialize a critical section across the members (blocking)."""
        fd = os.open(self.folder / ".lock.gate", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            flock(fd, fcntl.LOCK_EX, self.folder)
            yield
        finally:
            os.close(fd)

    def _refuse(self, holder: str) -> None:
        raise LockedError(f"{self.folder} is being written by another run ({holder or 'unknown'}). Wait for it "
                          "to finish, or stop it; a killed run releases the lock by itself.")

    def acquire(self) -> None:
        with self.gate():
            main = self._open(".lock")
            group_file = self.folder / ".lock.group"
            try:
                fcntl.flock(main, fcntl.LOCK_EX | fcntl.LOCK_NB)
                group_file.write_text(self.group)
                fcntl.flock(main, fcntl.LOCK_SH | fcntl.LOCK_NB)   # downgrade: let this run's ranks in
            except BlockingIOError:
                holder = group_file.read_text() if group_file.exists() else ""
                if holder != self.group or self.world == 1:
                    self._refuse(holder or os.pread(main, 64, 0).decode(errors="replace").strip())
                try:
                    fcntl.flock(main, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    self._refuse(holder)
            mine = self._open(f".lock.rank-{self.rank}")
            try:
                fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._refuse(f"another process already runs as rank {self.rank} of {self.group}")

    def release(self) -> None:
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "RunLock":
        try:
            self.acquire()
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()


GATE_BUSY = "a run that is starting or finishing (it holds the folder's gate)"


def lock_holder(folder: Path, patience_s: float = 2.0) -> str | None:
    """The run writing ``folder`` now (its group id, as recorded), or None when no run holds its lock.

    The probe takes the gate first, as a starting run does, so it never makes a starting run find the lock
    taken. A run holds the gate for seconds (calibrating, finalizing): after ``patience_s`` the probe stops
    waiting and answers ``GATE_BUSY`` (a stopped or stuck holder must not hang the caller). A folder whose
    lock files cannot be opened (a read-only mount) reports None.
    """
    folder = Path(folder)
    try:
        gate = os.open(folder / ".lock.gate", os.O_RDWR)
    except OSError:
        return None
    try:
        deadline = time.monotonic() + patience_s
        while True:
            try:
                fcntl.flock(gate, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return GATE_BUSY
                time.sleep(0.05)
        main = os.open(folder / ".lock", os.O_RDWR)
        try:
            fcntl.flock(main, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None  # closing the descriptor releases the probe
        except BlockingIOError:
            group = folder / ".lock.group"
            return (group.read_text().strip() if group.exists() else "") or "unknown"
        finally:
            os.close(main)
    except OSError:
        return None
    finally:
        os.close(gate)
