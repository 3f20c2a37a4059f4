"""Run a study end to end like a build system: materialize once, train every (variant, seed), evaluate every
checkpoint, write one report. Each stage has a digest of everything its output depends on -- its own settings
and the digests (or shard checksums) of its inputs -- recorded in ``OUT/.stages/`` when it finishes. A stage
whose recorded digest matches and whose outputs exist is skipped, so a rerun does nothing and changing one
setting reruns exactly the stages that depend on it.

Layout of ``OUT``: ``shards/`` (materialization), ``runs/<variant>-seed<S>/`` (training runs),
``eval/<evaluation>/<checkpoint>/`` (results), ``report/report.html|md``, ``study.json`` (resolved plan).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from rankshard.evaluate.study.config import StudyConfig
from rankshard.evaluate.study.jobs import execute
from rankshard.preprocess.progress import clock

FORMAT = "rankshard-study/1"


def digest(obj) -> str:
    """sha256 (16 hex digits) of a JSON-able object with sorted keys."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Stage:
    """One unit of work: ``kind`` (materialize | train | evaluate | report), its job for ``jobs.execute``,
    the digest of its inputs, and the files whose presence (with a matching record) means it is done."""

    id: str
    kind: str
    job: dict = field(compare=False)
    digest: str = ""
    outputs: tuple[str, ...] = ()


@dataclass
class Outcome:
    """What a ``run`` did: stage ids run and skipped, and the report's path."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None


class StudyProgress:
    """One line per stage with position, elapsed time and an ETA for the whole study.

    The ETA sums, over the stages still to run, the mean duration of finished stages of the same kind (this
    run, else earlier runs recorded in ``.stages/``); it is an estimate from measured stage times, shown as
    ``?`` until some stage of a kind has a measured time."""

    def __init__(self, totals: Counter, history: dict[str, list[float]], log: Callable[[str], None]):
        self.remaining, self.history, self.log = Counter(totals), history, log
        self.total, self.done, self.start = sum(totals.values()), 0, time.perf_counter()

    def eta(self) -> str:
        """Remaining time; kinds with no measured stage yet count at the mean of all measured stages and the
        ETA says it is rough (``~``)."""
        measured = [t for times in self.history.values() for t in times]
        if not measured:
            return "?"
        seconds, rough = 0.0, False
        for kind, count in self.remaining.items():
            times = self.history.get(kind) or measured
            rough |= bool(count) and not self.history.get(kind)
            seconds += count * sum(times) / len(times)
        return ("~" if rough else "") + clock(seconds)

    def finished(self, stage: Stage, seconds: float | None) -> None:
        self.done += 1
        self.remaining[stage.kind] -= 1
        if seconds is not None:
            self.history.setdefault(stage.kind, []).append(seconds)
        what = "up to date" if seconds is None else f"done in {seconds:.1f} s"
        self.log(f"[{self.done}/{self.total}] {stage.id}: {what} | elapsed {clock(time.perf_counter() - self.start)}"
                 f" | ETA {self.eta()}")


@dataclass
class Study:
    """A study and where it runs. ``jobs`` > 1 runs independent stages (trainings, evaluations) in that many
    processes, each on the next device of ``devices`` (e.g. ``cuda:0,cuda:1``; default: ``device``)."""

    cfg: StudyConfig
    out: Path
    device: str = "auto"
    workers: int = 2
    jobs: int = 1
    devices: tuple[str, ...] = ()
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))

    def __post_init__(self):
        self.out = Path(self.out)
        self.records = self.out / ".stages"

    # -- records -------------------------------------------------------------------------------------------
    def _record_path(self, stage: Stage) -> Path:
        return self.records / (stage.id.replace("/", "__") + ".json")

    def up_to_date(self, stage: Stage) -> bool:
        path = self._record_path(stage)
        if not path.is_file() or not all(Path(p).exists() for p in stage.outputs):
            return False
        return json.loads(path.read_text()).get("digest") == stage.digest

    def _history(self) -> dict[str, list[float]]:
        history: dict[str, list[float]] = {}
        for path in sorted(self.records.glob("*.json")) if self.records.is_dir() else []:
            rec = json.loads(path.read_text())
            history.setdefault(rec["kind"], []).append(rec["seconds"])
        return history

    def _write_record(self, stage: Stage, seconds: float) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "id": stage.id, "kind": stage.kind, "digest": stage.digest, "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        tmp = self._record_path(stage).with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        os.replace(tmp, self._record_path(stage))  # written last: a crash mid-stage leaves it to rerun

    # -- running -------------------------------------------------------------------------------------------
    def _device_for(self, i: int) -> str:
        return self.devices[i % len(self.devices)] if self.devices else self.device

    def _prepare(self, stage: Stage) -> None:
        """Forget a stale result: the record first (a crash now reruns it), then an evaluation's old files."""
        self._record_path(stage).unlink(missing_ok=True)
        if stage.kind == "evaluate":
            shutil.rmtree(stage.job["out"], ignore_errors=True)

    def run_level(self, stages: list[Stage], progress: StudyProgress, outcome: Outcome) -> None:
        """Run the stages of one level (independent of each other), skipping those up to date."""
        todo = []
        for stage in stages:
            if self.up_to_date(stage):
                outcome.skipped.append(stage.id)
                progress.finished(stage, None)
            else:
                todo.append(stage)
        for stage in todo:
            self._prepare(stage)
        if self.jobs > 1 and len(todo) > 1:
            self._run_parallel(todo, progress, outcome)
            return
        for stage in todo:
            start = time.perf_counter()
            execute(stage.kind, stage.job)
            self._finish(stage, time.perf_counter() - start, progress, outcome)

    def _finish(self, stage: Stage, seconds: float, progress: StudyProgress, outcome: Outcome) -> None:
        self._write_record(stage, seconds)
        outcome.ran.append(stage.id)
        progress.finished(stage, seconds)

    def _run_parallel(self, todo: list[Stage], progress: StudyProgress, outcome: Outcome) -> None:
        jobs = min(self.jobs, len(todo))
        threads = max(1, (os.cpu_count() or 1) // jobs)  # no oversubscription when the devices are CPUs
        # one fresh process per stage (max_tasks_per_child=1): CUDA_VISIBLE_DEVICES must be set before CUDA starts
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), initializer=_worker_init,
                                 initargs=(threads,), max_tasks_per_child=1) as pool:
            started = {}
            for i, stage in enumerate(todo):
                job = _on_device(stage, self._device_for(i))
                started[pool.submit(_timed, stage.kind, job)] = stage
            # Record every stage that finished, whichever failed: a rerun must not redo hours of training
            # because another stage of the same level failed. The first failure is raised after that.
            failures = []
            for future in as_completed(started):
                try:
                    seconds = future.result()
                except Exception as exc:  # noqa: BLE001 - re-raised below, once the others are recorded
                    if failures:  # the first is raised below; the others are said here
                        self.log(f"{started[future].id}: failed: {exc}")
                    failures.append(exc)
                    continue
                self._finish(started[future], seconds, progress, outcome)
        if failures:
            raise failures[0]


def _on_device(stage: Stage, device: str) -> dict:
    """The stage's job on ``device``; ``cuda:N`` becomes ``cuda`` with only GPU N visible to its process."""
    kind, _, index = device.partition(":")
    job = dict(stage.job, device=kind, visible_gpu=index if kind == "cuda" else None)
    if stage.kind == "train":
        job["config"] = dict(job["config"], device=kind)
    return job


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _timed(kind: str, job: dict) -> float:
    if job.get("visible_gpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = job["visible_gpu"]
    start = time.perf_counter()
    execute(kind, job)
    return time.perf_counter() - start
