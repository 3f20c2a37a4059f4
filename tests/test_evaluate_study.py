"""rankshard-study: the tiny example end to end on demo data, reruns that do nothing, and a changed evaluation
setting that reruns only that evaluation (and the report that shows it)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from rankshard.evaluate.study.cli import example_files, main
from rankshard.evaluate.study.config import StudyConfigError, load_study, parse_study
from rankshard.evaluate.study.jobs import flags
from rankshard.evaluate.study.plan import run_study
from rankshard.evaluate.study.runner import Study

TINY = example_files()["tiny"]


def test_examples_ship_and_parse():
    assert {"tiny", "cifar10-paper", "imagenet-paper"} <= set(example_files())
    for path in example_files().values():
        cfg = load_study(path)
        assert cfg.train.variants and cfg.evaluations
    tiny = load_study(TINY)
    assert [e.name for e in tiny.evaluations] == ["accuracy", "spectrum-rank", "spectrum-lowpass", "pgd"]
    assert tiny.train.seeds == (0, 1) and tiny.materialize.lowpass == (2, 4, 8)


@pytest.mark.parametrize("text,match", [
    ("colour = 1", "unknown top-level key"),
    ("[train]\nvariant = ['full']", r"\[train\]: unknown key\(s\) variant"),
    ("[[evaluate]]\nname = 'x'", "command = accuracy"),
    ("[[evaluate]]\ncommand = 'pgd'\n[[evaluate]]\ncommand = 'pgd'", "names .* repeat"),
    ("[data]\nsource = 'cifar10'", "needs path"),
    ("[train]\nseeds = [0, 0]", "list each seed once"),
    ("name = ", "not valid TOML"),
])
def test_bad_study_files_name_the_key(text, match):
    with pytest.raises(StudyConfigError, match=match):
        parse_study(text)


def test_flags_follow_the_commands_option_names():
    assert flags({"eps": "4/255", "targeted": True, "verify_shards": False, "variant": ["full", "rank-004"],
                  "steps": 3}) == ["--eps", "4/255", "--targeted", "--no-verify-shards", "--variant", "full",
                                   "--variant", "rank-004", "--steps", "3"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    lines = []
    study = Study(load_study(TINY), out, device="cpu", workers=0, log=lines.append)
    first = run_study(study)
    yield study, first, lines


def test_tiny_study_runs_end_to_end(tiny_study):
    study, outcome, lines = tiny_study
    assert len(outcome.ran) == 22 and not outcome.skipped  # 1 + 4 trainings + 4 x 4 evaluations + report
    assert lines[-1].startswith("[22/22] report: done") and "ETA" in lines[0]
    md = (study.out / "report" / "report.md").read_text()
    for needle in ("top-1 mean ± 95% CI (%)", "paired tests on the same points (top-1)",
                   "paired tests on the same points (attack success)", "bands.png", "rank-vs-lowpass",
                   "Rank truncation vs frequency truncation", "McNemar p"):
        assert needle in md, needle
    plan = json.loads((study.out / "study.json").read_text())
    assert len(plan["stages"]) == 20 and (study.out / "runs" / "rank-004-seed1" / "best.pt").is_file()


def test_rerun_does_nothing(tiny_study):
    study, _, _ = tiny_study
    before = (study.out / "report" / "report.html").stat().st_mtime_ns
    again = run_study(Study(study.cfg, study.out, device="cpu", workers=0, log=lambda _: None))
    assert again.ran == [] and len(again.skipped) == 22
    assert (study.out / "report" / "report.html").stat().st_mtime_ns == before


def test_changed_evaluation_setting_reruns_only_that_evaluation(tiny_study, tmp_path):
    study, _, _ = tiny_study
    text = TINY.read_text()
    assert "steps = 3" in text
    edited = tmp_path / "tiny.toml"
    edited.write_text(text.replace("steps = 3", "steps = 4"))
    changed = run_study(Study(load_study(edited), study.out, device="cpu", workers=0, log=lambda _: None))
    assert sorted(changed.ran) == sorted([f"eval/pgd/{v}-seed{s}" for v in ("full", "rank-004") for s in (0, 1)]
                                         + ["report"])
    pgd = json.loads((study.out / "eval" / "pgd" / "full-seed0" / "pgd.json").read_text())
    assert pgd["attack"]["steps"] == 4


def test_cli_lists_examples():
    result = CliRunner().invoke(main, ["examples"])
    assert result.exit_code == 0 and "tiny" in result.output and "cifar10-paper" in result.output
