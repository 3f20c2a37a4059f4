"""rankshard-study resume: what a stage's digest must cover, and what a failed level must still record.
Planned on a hand-made shard manifest and stages (no training), so it runs in seconds."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.study.config import parse_study
from rankshard.evaluate.study.plan import eval_stages
from rankshard.evaluate.study.runner import Outcome, Stage, Study, StudyProgress

STUDY = """
[train]
variants = ["full"]
seeds = [0]
{extra}
[[evaluate]]
command = "accuracy"
"""


def _planned_evals(out, extra: str) -> list[Stage]:
    manifest = out / "shards" / "cifar10" / "test" / "full" / "manifest.json"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps({"shards": [{"sha256": "00" * 32}]}))
    study = Study(parse_study(STUDY.format(extra=extra)), out, device="cpu", workers=0, log=lambda _: None)
    train = Stage("train/full-seed0", "train", {"name": "full-seed0", "out": str(out / "runs" / "full-seed0")},
                  "same-training")
    return eval_stages(study, [train])


def test_evaluating_another_checkpoint_file_is_not_up_to_date(tmp_path):
    (best,) = _planned_evals(tmp_path, "")
    (last,) = _planned_evals(tmp_path, 'checkpoint = "last.pt"')
    assert best.job["checkpoint"].endswith("best.pt") and last.job["checkpoint"].endswith("last.pt")
    # same training, other file: the results of best.pt must not be reused for last.pt
    assert best.digest != last.digest


def test_a_failed_parallel_stage_keeps_the_records_of_those_that_finished(tmp_path):
    run = tmp_path / "run"  # a training run folder: enough for a report stage to succeed
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train": {"loss": 1.0, "top1": 0.5}}) + "\n")
    (tmp_path / "empty").mkdir()
    bad = Stage("report-bad", "report", {"sources": [str(tmp_path / "empty")], "runs": [], "out": str(tmp_path / "r1")},
                "d1", (str(tmp_path / "r1" / "report.html"),))
    good = Stage("report-good", "report", {"sources": [], "runs": [str(run)], "out": str(tmp_path / "r2")},
                 "d2", (str(tmp_path / "r2" / "report.html"),))
    study = Study(parse_study(STUDY.format(extra="")), tmp_path / "study", device="cpu", workers=0, jobs=2,
                  log=lambda _: None)
    progress, outcome = StudyProgress(Counter({"report": 2}), {}, lambda _: None), Outcome()
    with pytest.raises(EvaluationError, match="nothing to report"):
        study.run_level([bad, good], progress, outcome)  # bad is submitted first
    assert study.up_to_date(good) and not study.up_to_date(bad)
    assert outcome.ran == ["report-good"]
