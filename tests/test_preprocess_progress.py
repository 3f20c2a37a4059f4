"""rankshard.preprocess.progress: the one progress bar's rate and its lines in a log file."""
import io

from rankshard.preprocess import progress
from rankshard.preprocess.progress import Progress, rate_text


def test_a_slow_rate_is_not_shown_as_zero():
    """An AutoAttack sweep on CPU runs at ~0.4 img/s; the bar said '0 img/s'."""
    assert rate_text(0.42) == "0.42" and rate_text(3.456) == "3.5"
    assert rate_text(6556.2) == "6,556" and rate_text(42.4) == "42" and rate_text(0) == "0"


def test_a_log_gets_the_final_line_once(monkeypatch):
    """In a log (no tty) a line drawn at the last update was printed again by close(): the same 10/10 twice."""
    clock = iter([0.0, 24.0, 24.1])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = Progress(10, "robustness r5", stream=log)
    bar.update(10)                   # 24 s later: past log_every, so a line is drawn
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "10/10" in lines[0] and "0.42 img/s" in lines[0]


def test_close_prints_the_final_count_when_the_log_has_not_seen_it(monkeypatch):
    clock = iter([0.0, 11.0, 12.0, 12.5])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = Progress(10, "x", stream=log)
    bar.update(5)                    # drawn (11 s)
    bar.update(5)                    # not drawn (1 s later)
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[2] for line in lines] == ["5/10", "10/10"]
