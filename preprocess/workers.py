"""A process pool that fails loudly: a dead worker stops the job at once and says who died doing what.

``multiprocessing.Pool`` replaces a worker that dies (OOM kill, segfault, ``kill -9``) and silently drops
the task it held, so the job's ``result.get()`` waits forever. Here every worker holds at most one task
and the main process waits on the workers' result pipes *and* their process sentinels together
(``multiprocessing.connection.wait``): a death is seen the moment it happens, with no timeout, so
healthy slow work is never mistaken for a hang.

Stopping is prompt and leaves no orphans: SIGTERM becomes an ``Interrupted`` error in the main process,
Ctrl-C (SIGINT, sent to the whole terminal process group) is left to the main process, which terminates
the workers on the way out; and each worker asks Linux to kill it if the main process dies first
(``PR_SET_PDEATHSIG``), so a ``kill -9`` of the main process takes its workers with it.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import multiprocessing as mp
import os
import signal
import sys
import traceback
from pathlib import Path
from multiprocessing.connection import wait
from typing import Any, Callable

from rankshard.preprocess.errors import RankshardError

_RESUME = "Finished shards are kept (partial ones are never renamed into place); rerun the same command to resume."


class WorkerDied(RankshardError):
    """A worker process ended while it held a task (exit, OOM kill, segfault)."""


class Interrupted(RankshardError):
    """The main process was asked to stop (Ctrl-C or SIGTERM)."""


def describe_exit(exitcode: int | None) -> str:
    """'was killed by SIGKILL (...)' / 'exited with status 3' for a Process.exitcode."""
    if exitcode is None:
        return "closed its result pipe"
    if exitcode < 0:
        name = signal.Signals(-exitcode).name if -exitcode in signal.Signals._value2member_map_ else str(-exitcode)
        hint = {"SIGKILL": " (what the Linux OOM killer sends: check `dmesg` and lower --workers or "
                           "--batch-size)", "SIGSEGV": " (a crash in native code)"}.get(name, "")
        return f"was killed by {name}{hint}"
    return f"exited with status {exitcode}"


def _die_with_parent() -> None:
    # Linux only: deliver SIGKILL to this worker when the process that started it dies (kill -9 included).
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _status_mb(*fields: str) -> tuple[float | None, ...]:
    """``fields`` of /proc/self/status (VmHWM, VmRSS, ...) in MB, from one read; None where missing."""
    found: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in fields:
                    found[name] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return tuple(found.get(field) for field in fields)


def own_peak_rss_mb() -> float | None:
    """This process's own peak resident memory in MB (Linux ``VmHWM``), None where /proc is missing.

    Not ``ru_maxrss``: a spawned worker inherits its parent's peak there. Python starts it by vfork + exec,
    and Linux's exec keeps the larger of the old and new address spaces' high-water marks in ``ru_maxrss``;
    after a vfork the old one is the *parent's*, so a 28 MB worker of a main process that had peaked at
    526 MB reports 526 MB (and so does ``RUSAGE_CHILDREN`` in the parent). ``VmHWM`` starts afresh at exec.
    """
    return _status_mb("VmHWM")[0]


def own_rss_mb() -> float | None:
    """This process's resident memory now, MB (Linux ``VmRSS``). Taken between tasks, after the heap is
    trimmed, it is what a worker *holds* from one task to the next: the figure a leak makes grow. (The peak
    is a maximum over every task, so it can creep up with the number of tasks without anything being kept.)"""
    return _status_mb("VmRSS")[0]


def _trim_heap() -> None:
    """Give freed heap pages back to the OS between tasks (glibc ``malloc_trim``; a no-op elsewhere).

    Without it, a worker running the numeric chain (tensors of many sizes) fragments its heap and each new
    shard's arrays land on fresh pages: its peak crept from 321 to 400 MB over its first five CIFAR shards.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _exit_now() -> None:
    """End a worker whose pipe has closed without Python's interpreter teardown.

    Every task's output is already written and renamed, and its answer sent, so nothing is left to do.
    Tearing down a process that imported torch took ~0.6 s here, which the main process waited out at the
    end of every job (a sixth of a 4k-image CIFAR run).
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).fflush(None)  # C stdio too: what a native library printf-ed into a pipe or file
    os._exit(0)


def _serve(conn, preload: tuple[str, ...] = ()) -> None:
    """Worker loop: receive (fn, arg), send back ("ok", result, None, memory) or ("error", exception,
    traceback text, memory); memory is (own peak RSS, RSS held after the task), see ``own_peak_rss_mb`` and
    ``own_rss_mb``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    _die_with_parent()
    for module in preload:  # while the main process still sets up, not when the first task arrives
        importlib.import_module(module)
    conn.send(("ready",))  # started: from now on a task is taken at once (see WorkerPool.poll)
    while True:
        try:
            fn, arg = conn.recv()
        except (EOFError, OSError):  # the main process closed the pipe or is gone
            _exit_now()
        try:
            reply = ("ok", fn(arg), None)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the main process
            reply = ("error", exc, traceback.format_exc())
        # Drop this task's argument before answering: held through the next recv(), a shard job's arrays
        # (~13 MB for 1000 CIFAR images x 5 variants) would sit beside the next one's. What is held then is
        # this worker's own state plus the answer (a shard's summary; a decoded chunk on the GPU path).
        del fn, arg
        _trim_heap()
        memory = _status_mb("VmHWM", "VmRSS")  # (own peak, held now): see own_peak_rss_mb, own_rss_mb
        try:
            conn.send((*reply, memory))
        except Exception as exc:  # an unpicklable exception or result: send its text instead
            conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc(), memory))
        del reply
        _trim_heap()  # and the answer's pages, before waiting for the next task


class Task:
    """A submitted call; ``get()`` blocks until it is done, re-raising the worker's exception."""

    def __init__(self, pool: "WorkerPool", fn: Callable, arg: Any, what: str):
        self.pool, self.fn, self.arg, self.what = pool, fn, arg, what
        self.done, self.value, self.error = False, None, None

    def get(self) -> Any:
        while not self.done:
            self.pool._step()
        if self.error is not None:
            raise self.error
        return self.value


class _Worker:
    def __init__(self, ctx, preload: tuple[str, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, preload), daemon=True, name="rankshard-worker")
        self.process.start()
        child.close()
        self.task: Task | None = None
        self.used = False
        self.ready = False  # it said it has started (imported its preload) and reads its pipe
        self.peak_rss_mb: float | None = None  # its own peak, as it last reported it
        # its resident memory after each of its last tasks (heap trimmed): flat unless it keeps something
        self.held_mb: collections.deque[float] = collections.deque(maxlen=256)


class _RemoteTraceback(Exception):
    def __str__(self) -> str:
        return f"\n(in the worker process)\n{self.args[0]}"


class WorkerPool:
    """``n`` spawn workers, one task each at a time; tasks beyond that wait in this process.

    Use as a context manager: leaving it normally closes the workers, leaving it by an exception (a
    dead worker, an error, Ctrl-C, SIGTERM) terminates them first, so nothing outlives the job.
    """

    def __init__(self, n: int, preload: tuple[str, ...] = ()):
        """``preload``: modules each worker imports as soon as it starts (torch takes seconds: a pool opened
        early overlaps that with the main process's own setup)."""
        # spawn, not fork: forking a process that has run torch/OpenMP threads can deadlock the child
        ctx = mp.get_context("spawn")
        self.workers = [_Worker(ctx, preload) for _ in range(n)]
        self.queue: collections.deque[Task] = collections.deque()
        self._old_sigterm = None

    def submit(self, fn: Callable, arg: Any, what: str) -> Task:
        """Run ``fn(arg)`` in a worker; ``what`` says what the task is, for the error if its worker dies."""
        task = Task(self, fn, arg, what)
        self.queue.append(task)
        self._dispatch()
        return task

    def _dispatch(self) -> None:
        for w in sorted(self.workers, key=lambda w: not w.ready):  # started workers first: a send never waits
            if not self.queue:
                return
            if w.task is None:
                w.task, w.used = self.queue.popleft(), True
                try:
                    w.conn.send((w.task.fn, w.task.arg))
                except (BrokenPipeError, ConnectionResetError, EOFError):
                    self._died(w)
                w.task.arg = None  # the worker has its copy; don't keep a shard's arrays alive twice

    def _step(self, extra: tuple = ()) -> None:
        """Wait until some worker answers or dies, or one of ``extra`` (connections of the caller's own) is
        readable; record answers, raise WorkerDied on a death."""
        # busy workers' answers, and the "ready" of workers still starting (so a caller scheduling by hand
        # sees a worker the moment it starts, not when some busy one finishes)
        busy = {w.conn: w for w in self.workers if w.task is not None or not w.ready}
        if not busy and not extra:
            raise RuntimeError("WorkerPool: waiting on a task that no worker holds")
        ready = set(wait([*busy, *(w.process.sentinel for w in self.workers), *extra]))
        for conn, w in busy.items():
            if conn in ready or w.process.sentinel in ready:
                self._receive(w)  # its answer, or end-of-file if it died -> WorkerDied
        for w in self.workers:
            if w.process.sentinel in ready:  # a worker only exits when its pipe closes: any exit now is a death
                self._died(w)
        self._dispatch()

    def _receive(self, w: _Worker) -> None:
        try:
            reply = w.conn.recv()
        except Exception:  # EOF, or a message cut short by the death
            self._died(w)
        if reply[0] == "ready":
            w.ready = True
            return
        task, w.task = w.task, None
        task.done = True
        kind, value, text, (w.peak_rss_mb, held) = reply
        if held is not None:
            w.held_mb.append(held)
        if kind == "ok":
            task.value = value
        else:
            task.error = value
            task.error.__cause__ = _RemoteTraceback(text)

    @property
    def peak_rss_mb(self) -> float | None:
        """The largest peak resident memory any worker has reported (its own, see ``own_peak_rss_mb``), MB."""
        return max((w.peak_rss_mb for w in self.workers if w.peak_rss_mb is not None), default=None)

    # -- scheduling by hand: for a caller that also works while the workers start -------------------------
    def poll(self) -> None:
        """Take note, without waiting, of idle workers that have started (or died while starting)."""
        for w in self.workers:
            if w.task is None and not w.ready:
                if w.conn.poll():
                    self._receive(w)
                elif not w.process.is_alive():
                    self._died(w)

    def idle_ready(self) -> bool:
        """Some started worker has no task: a task submitted now runs at once."""
        return any(w.ready and w.task is None for w in self.workers)

    def any_ready(self) -> bool:
        return any(w.ready for w in self.workers)

    def wait_any(self, extra: tuple = ()) -> None:
        """Block until some busy worker answers, a starting worker is ready, one dies (WorkerDied), or one of
        ``extra`` is readable (a caller's own work finishing)."""
        self._step(extra)

    def _died(self, w: _Worker) -> None:
        w.process.join(timeout=2)  # the sentinel fired, so the exit code is there (or arrives at once)
        what = w.task.what if w.task is not None else ("idle" if w.ready else "starting up")
        raise WorkerDied(f"worker process {w.process.pid} {describe_exit(w.process.exitcode)} while {what}. "
                         f"The job is stopped rather than left waiting for a result that will never come. {_RESUME}")

    # -- lifetime ------------------------------------------------------------------------------------
    def __enter__(self) -> "WorkerPool":
        if _in_main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, _raise_interrupted)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)
        self.shutdown(wait_for_idle=kind is None)
        if kind is KeyboardInterrupt:
            raise Interrupted(f"interrupted (Ctrl-C); the workers were stopped. {_RESUME}") from None

    def shutdown(self, wait_for_idle: bool = True) -> None:
        """Stop every worker: politely (EOF on its pipe) when all is well, at once otherwise."""
        for w in self.workers:
            with contextlib.suppress(OSError):
                w.conn.close()
            # a worker that never had a task may still be importing its preload: nothing to wait for
            if (not wait_for_idle or not w.used) and w.process.is_alive():
                w.process.terminate()
        for w in self.workers:
            w.process.join(timeout=5)
            if w.process.is_alive():  # ignored SIGTERM / stuck in native code: no orphans either way
                w.process.kill()
                w.process.join(timeout=5)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(f"stopped by {signal.Signals(signum).name}; the workers were stopped. {_RESUME}")


# -- observing a running job from outside (the kill tests and the soak benchmark) ---------------------------


def worker_pids(parent: int) -> list[int]:
    """Pids of the spawn workers (Linux /proc) among ``parent``'s children (not its resource tracker)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in cmdline:
            pids.append(int(stat.parent.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; it only waits for its parent to reap it
