"""rankshard-study: the tiny example end to end on demo data, reruns that do nothing, and a changed evaluation
setting that reruns only that evaluation (and the report that shows it); ``run --quiet`` drops the progress
lines and keeps errors and the summary."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rankshard.evaluate.study.cli import example_files, main
from rankshard.evaluate.study.config import StudyConfigError, load_study, parse_study, plain
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
    # values of another type: were TypeErrors, AttributeErrors and ValueErrors from parsing or planning
    ("data = 5", "data = 5: expected a table"),
    ("[train]\nseeds = 3", r"\[train\] seeds = 3: expected a list of a whole number"),
    ("[materialize]\nranks = [1, 'x']", r"\[materialize\] ranks = \[1, 'x'\]: expected a list"),
    ("[data]\ndataset = 10", r"\[data\] dataset = 10: expected text"),
    ("[train]\noverrides = 'x'", "expected a table"),
    ("evaluate = 3", "write each evaluation as an \\[\\[evaluate\\]\\] section"),
    ("evaluate = ['pgd']", r"\[\[evaluate\]\] #1 = 'pgd': expected a table"),
    ("[[evaluate]]\ncommand = 'pgd'\nname = ['a']", r"#1 name = \['a'\]: expected text"),
    ("report = 'yes'", "report = 'yes': expected true or false"),
])
def test_bad_study_files_name_the_key(text, match):
    with pytest.raises(StudyConfigError, match=match):
        parse_study(text)




def test_a_study_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "study.toml"
    path.write_bytes(b'name = "caf\xe9"\n')  # Latin-1: was a UnicodeDecodeError
    with pytest.raises(StudyConfigError, match=f"{path}: not UTF-8 text"):
        load_study(path)

def _toml(value) -> str:
    """A TOML value (inline tables and arrays) for the property test below."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value) if isinstance(value, str) else str(value)


def test_a_study_file_with_values_of_other_types_is_refused_naming_the_key(tmp_path):
    """Property test: every key of the shipped tiny study (sections, their keys, the first list item, three
    levels deep) deleted or given a value of each other TOML type: parse_study raises StudyConfigError, or the study plans its first stage;
    never a TypeError or AttributeError from deep inside."""
    import tomllib

    from fuzzing import field_paths, with_field
    from rankshard.evaluate.study.jobs import _variant_flags
    from rankshard.evaluate.study.plan import materialize_stage, stage_counts

    original = tomllib.loads(TINY.read_text())
    for path in field_paths(original, depth=3):
        for value in (..., 3, 1.5, "x", True, [], [1], ["x"], {"a": 1}):  # ...: the key deleted
            doc = with_field(original, path, value)
            text = "\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in doc.items())
            try:
                cfg = parse_study(text)
            except StudyConfigError:
                continue
            stage_counts(cfg)
            _variant_flags(materialize_stage(Study(cfg, tmp_path, device="cpu", workers=0)).job["materialize"])
            for evaluation in cfg.evaluations:
                flags(plain(evaluation.options) or {})

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


def _cli_run(study_file, out, *extra):
    return CliRunner().invoke(main, ["run", str(study_file), "--out", str(out), "--device", "cpu", "--workers", "0",
                                     *extra])


def test_quiet_drops_the_progress_lines_and_nothing_else(tiny_study, tmp_path):
    study, _, _ = tiny_study
    loud_out, quiet_out = tmp_path / "loud", tmp_path / "quiet"
    for copy in (loud_out, quiet_out):  # two copies of one state: both runs have the same work to do
        shutil.copytree(study.out, copy)
    loud, quiet = _cli_run(TINY, loud_out), _cli_run(TINY, quiet_out, "--quiet")
    assert loud.exit_code == quiet.exit_code == 0, loud.output + quiet.output
    assert "[1/22] materialize: up to date" in loud.stderr and "[22/22] report" in loud.stderr
    assert quiet.stderr == ""
    assert "22 up to date; report: " in quiet.stdout
    assert quiet.stdout.replace(str(quiet_out), "OUT") == loud.stdout.replace(str(loud_out), "OUT")
    assert (quiet_out / "study.json").read_text() == (loud_out / "study.json").read_text()


def test_quiet_keeps_errors(tiny_study, tmp_path):
    study, _, _ = tiny_study
    edited = tmp_path / "tiny.toml"
    edited.write_text(TINY.read_text().replace('variants = ["full", "rank-004"]', 'variants = ["full", "rank-003"]'))
    # materialize is up to date; planning the trainings then fails before anything is written
    loud, quiet = _cli_run(edited, study.out), _cli_run(edited, study.out, "--quiet")
    assert loud.exit_code == quiet.exit_code == 2
    assert quiet.stderr.startswith("error: cifar10/train/rank-003 was not materialized")
    assert "[1/" not in quiet.stderr and loud.stderr.startswith("[1/22] materialize: up to date")
    assert loud.stderr.endswith(quiet.stderr) and loud.stdout == quiet.stdout == ""


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


def test_changing_how_an_evaluation_runs_does_not_redo_it(tiny_study, tmp_path):
    """Loader workers and the shard check change how, not what: the finished evaluations stand."""
    study, _, _ = tiny_study
    base, edited = tmp_path / "base.toml", tmp_path / "edited.toml"
    base.write_text(TINY.read_text())
    edited.write_text(TINY.read_text().replace("steps = 3", "steps = 3\nworkers = 1\nverify_shards = false"))
    assert plain(load_study(edited).evaluations[-1].options)["workers"] == 1
    run_study(Study(load_study(base), study.out, device="cpu", workers=0, log=lambda _: None))  # whatever ran before
    again = run_study(Study(load_study(edited), study.out, device="cpu", workers=0, log=lambda _: None))
    assert again.ran == []  # no evaluation, so not the report either


def test_cli_imports_without_torch():
    # the study runs torch commands in-process, but only when a stage runs: its CLI must not load torch at import
    code = "import sys; from rankshard.evaluate.study.cli import main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_cli_lists_examples():
    result = CliRunner().invoke(main, ["examples"])
    assert result.exit_code == 0 and "tiny" in result.output and "cifar10-paper" in result.output
