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
