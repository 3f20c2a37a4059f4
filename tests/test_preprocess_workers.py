"""The worker pool: results and errors come back, a dead worker stops the job at once, nothing is orphaned."""
import os
import signal
import time

import pytest
from procs import alive

from rankshard.preprocess.workers import Interrupted, WorkerDied, WorkerPool, describe_exit


def test_results_come_back_in_submission_order_and_errors_are_reraised():
    with WorkerPool(2) as pool:
        tasks = [pool.submit(abs, -i, f"abs({-i})") for i in range(7)]
        assert [t.get() for t in tasks] == list(range(7))
        bad = pool.submit(int, "x", "int('x')")
        with pytest.raises(ValueError, match="invalid literal"):
            bad.get()
        assert pool.submit(abs, -3, "still serving").get() == 3


def test_a_worker_killed_mid_task_stops_the_job_and_names_pid_signal_and_task():
    with pytest.raises(WorkerDied) as info, WorkerPool(2) as pool:
        slow = pool.submit(time.sleep, 600, "decoding shard train-000007.tar")  # healthy but slow
        pid = pool.workers[0].process.pid
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        try:
            slow.get()
        finally:
            assert time.monotonic() - start < 10
    message = str(info.value)
    assert f"worker process {pid} was killed by SIGKILL" in message
    assert "decoding shard train-000007.tar" in message and "rerun the same command" in message
    assert not any(alive(w.process.pid) for w in pool.workers), "the other workers must be stopped"


def test_sigterm_to_the_main_process_stops_the_workers():
    with pytest.raises(Interrupted, match="SIGTERM"), WorkerPool(2) as pool:
        task = pool.submit(time.sleep, 600, "sleeping")
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        old = signal.signal(signal.SIGALRM, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
        try:
            task.get()
        finally:
            signal.signal(signal.SIGALRM, old)
    assert not any(alive(w.process.pid) for w in pool.workers)


def test_exit_descriptions():
    assert describe_exit(-9).startswith("was killed by SIGKILL (what the Linux OOM killer sends")
    assert describe_exit(-11).startswith("was killed by SIGSEGV")
    assert describe_exit(3) == "exited with status 3"


# What a console script does (`from rankshard.preprocess.cli import main`), then a decode/write pool as the
# GPU path opens it. A spawned worker re-imports this script as its main module before its first task, so a
# CLI import that pulls in torch puts torch (~1.4 s of CPU, ~180 MB) into every worker.
_CLI_SCRIPT = '''
import sys
from rankshard.preprocess.cli import main  # noqa: F401 - what .venv/bin/rankshard-preprocess runs first
from rankshard.preprocess.workers import WorkerPool


def heavy(_):
    return sorted(m for m in ("torch", "torchvision", "cupy") if m in sys.modules)


if __name__ == "__main__":
    print("main:", heavy(None))
    with WorkerPool(1, preload=("rankshard.preprocess.writer",)) as pool:
        print("worker:", pool.submit(heavy, None, "which heavy modules are imported").get())
'''


def test_a_decode_and_write_worker_under_the_cli_does_not_import_torch(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "rankshard-preprocess-like.py"
    script.write_text(_CLI_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["main: []", "worker: []"], out.stdout
