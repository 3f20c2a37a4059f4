"""The report on partial or damaged result folders: a malformed result is skipped by name without taking the
other results of its kind with it, and a per-sample file that is gone is listed (its checkpoint then missing
from the paired tests must not go unsaid). Results are written by hand through the result contract."""
from __future__ import annotations

import json

import numpy as np

from rankshard.evaluate.comparisons import accuracy_samples_name
from rankshard.evaluate.report import build_report
from rankshard.evaluate.results import write_csv, write_result

DATA = "cifar10/test/full"


def _spectrum(folder, name: str, top1: float):
    rows = [{"rank": k, "top1": top1 if k else 0.1, "agreement": 1.0 if k else 0.1, "count": 20} for k in (0, 4, 32)]
    return write_result(folder, "spectrum", {"checkpoint": name, "path": f"{name}.pt", "trained_on": "full",
                                             "data": DATA, "mode": "low", "svd": {}, "rows": rows},
                        config={}, device="cpu", qualifier=f"low-{name}")


def _accuracy(folder, correct: dict[str, np.ndarray]):
    """One accuracy result with a per-sample CSV per checkpoint (label 0; pred 0 where correct)."""
    rows, files = [], []
    for name, ok in correct.items():
        rows.append({"checkpoint": name, "trained_on": "full", "data": DATA, "top1": float(ok.mean()),
                     "top5": 1.0, "count": len(ok)})
        files.append(write_csv(folder / accuracy_samples_name(name, DATA),
                               [{"key": f"{i:08d}", "label": 0, "pred": 0 if c else 1, "top5": True}
                                for i, c in enumerate(ok)]))
    return write_result(folder, "accuracy", {"rows": rows}, config={}, device="cpu", files=files)


def test_one_malformed_result_skips_only_itself(tmp_path):
    res = tmp_path / "results"
    for i, name in enumerate(("a", "b", "c", "d")):
        _spectrum(res, name, 0.5 + 0.1 * i)
    bad = res / "spectrum-low-b.json"
    body = json.loads(bad.read_text())
    del body["mode"]  # hand-edited / older result
    bad.write_text(json.dumps(body))
    report = build_report([res], tmp_path / "report")
    assert [(s.path, s.reason.split(" (")[0]) for s in report.skipped] == [(str(bad), "malformed spectrum result")]
    md = report.markdown.read_text()
    assert "| rank | a | c | d |" in md  # the three good checkpoints, in one table
    assert "| 4 | 50.00% | 70.00% | 80.00% |" in md


def test_figures_drawn_by_a_failed_attempt_are_not_left_in_the_report(tmp_path):
    """The group drew the first data's figures, then failed on another data's malformed result: the report's
    figures folder holds exactly the figures the report links."""
    res = tmp_path / "results"
    for i, name in enumerate(("a", "b")):
        _spectrum(res, name, 0.5 + 0.1 * i)
    bad = _spectrum(res, "z", 0.9)
    body = json.loads(bad.read_text())
    body["data"] = "zz/test/full"  # sorted after DATA: its section comes second
    for row in body["rows"]:
        del row["count"]
    bad.write_text(json.dumps(body))
    report = build_report([res], tmp_path / "report")
    assert [s.path for s in report.skipped] == [str(bad)]
    md = report.markdown.read_text()
    figures = sorted(p.name for p in (tmp_path / "report" / "figures").iterdir())
    assert figures and all(name in md for name in figures)


def test_a_missing_per_sample_file_is_listed_not_dropped(tmp_path):
    res = tmp_path / "results"
    rng = np.random.default_rng(0)
    _accuracy(res, {n: rng.random(30) < 0.6 for n in ("x", "y", "z")})
    gone = res / accuracy_samples_name("z", DATA)
    gone.unlink()
    report = build_report([res], tmp_path / "report")
    assert [s.path for s in report.skipped] == [str(gone)]
    assert "left out of the paired tests" in report.skipped[0].reason
    md = report.markdown.read_text()
    assert "| z | full | cifar10/test/full |" in md and "left out of the paired tests" in md


def test_one_checkpoint_name_in_two_result_folders_is_shown_once_and_the_other_listed(tmp_path):
    """Two runs' best.pt, each evaluated alone, are both labelled "best": merged, the later replaced the earlier
    in every table, curve and paired test without a word."""
    _spectrum(tmp_path / "run1", "best", 0.5)
    clash = _spectrum(tmp_path / "run2", "best", 0.9)
    _accuracy(tmp_path / "run1", {"best": np.arange(30) < 15, "other": np.arange(30) < 12})
    clash_accuracy = _accuracy(tmp_path / "run2", {"best": np.arange(30) < 29})
    report = build_report([tmp_path / "run1", tmp_path / "run2"], tmp_path / "report")
    assert sorted(s.path for s in report.skipped) == sorted([str(clash), str(clash_accuracy)])
    first = str(tmp_path / "run1" / "spectrum-low-best.json")
    assert any(f"'best' (low rank on {DATA}) is also in {first}" in s.reason and "NAME=PATH" in s.reason
               for s in report.skipped)
    md = report.markdown.read_text()
    assert "| 4 | 50.00% |" in md and "90.00%" not in md  # run1's curve, not run2's silently in its place
    assert "96.67%" not in md
    assert md.count(f"| best | full | {DATA} |") == 1


def test_one_folder_given_twice_is_read_once_not_flagged_as_a_name_clash(tmp_path, monkeypatch):
    _spectrum(tmp_path / "run1", "best", 0.5)
    monkeypatch.chdir(tmp_path)
    report = build_report([tmp_path / "run1", "run1"], tmp_path / "report")  # absolute and relative
    assert report.skipped == []
