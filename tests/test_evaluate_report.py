"""The README's paper walkthrough on demo-sized data: every evaluate subcommand writes a result, ``report``
renders each kind plus training curves, and lists what it skipped (with the reason) on the page and stderr."""
import json

import pytest
from click.testing import CliRunner

from evaluate_demo import demo_shards, tiny_checkpoint
from rankshard.evaluate.cli import main
from rankshard.evaluate.tables import SPECTRUM_ALL_RANKS, spectrum_table
from rankshard.train.rundir import append_metrics, plot_curves

# one section title per kind, as report.html and report.md must show them
SECTIONS = ("Accuracy", "Rank spectrum (low rank)", "PGD robustness", "Rank Integrated Gradients", "Weight spectra",
            "SVD profile", "Training run full", "Skipped")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """Demo shards (40 CIFAR-sized test images, rank 3), two untrained width-4 checkpoints, a 2-epoch run folder."""
    root = tmp_path_factory.mktemp("paper")
    demo_shards(root / "shards", 4, seed=5)
    ckpts = [f"{v}={tiny_checkpoint(root / f'{v}.pt', seed, train_variant=v)}"
             for seed, v in enumerate(("full", "rank-003"))]
    run = root / "runs" / "full"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"config": {"arch": "resnet18", "train_variant": "full"}}))
    records = [{"epoch": e, "step": 5 * e, "train": {"loss": 2.3 / e, "top1": 0.1 * e},
                "eval": {"full": {"loss": 2.2 / e, "top1": 0.12 * e}}} for e in (1, 2)]
    for r in records:
        append_metrics(run, r)
    plot_curves(run, records, lambda step: 0.1, 5)
    return root, ckpts, run


def _ok(*args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_paper_walkthrough_report_has_every_section(paper, tmp_path):
    root, ckpts, run = paper
    res, data = tmp_path / "results", ["--data", root / "shards", "--device", "cpu", "--quiet"]
    loader = [*data, "--workers", "0", "--batch-size", "20"]
    _ok("accuracy", *ckpts, *loader, "--variant", "full", "--variant", "rank-003", "--out", res / "acc")
    _ok("spectrum", *ckpts, *loader, "--ranks", "0:32:4", "--limit", "20", "--svd-backend", "torch",
        "--out", res / "spectrum")
    _ok("pgd", *ckpts, *loader, "--eps", "4/255", "--steps", "2", "--limit", "8", "--out", res / "pgd")
    _ok("rig", *ckpts, *data, "--index", "0:2", "--stride", "8", "--svd-backend", "torch", "--check",
        "--randomization", "all", "--out", res / "rig")
    _ok("weights", *ckpts, "--layers", "conv1,fc", "--top-k", "2", "--no-permuted", "--workers", "1", "--quiet",
        "--out", res / "weights")
    _ok("svd-profile", ckpts[0], *loader, "--per-class", "2", "--layers", "layer4.*,fc", "--top-k", "4",
        "--out", res / "profile")
    (res / "bogus.json").write_text(json.dumps({"format": "rankshard-eval/1", "kind": "bogus"}))
    (res / "broken.json").write_text("{not json")
    done = _ok("report", res, "--runs", run, "--out", tmp_path / "report")
    html = (tmp_path / "report" / "report.html").read_text()
    md = (tmp_path / "report" / "report.md").read_text()
    for title in SECTIONS:
        assert f"<h2>{title}" in html and f"## {title}" in md, title
    for page in (html, md):
        assert "bogus.json" in page and "unknown kind" in page and "broken.json" in page and "unreadable" in page
    assert "bogus.json: unknown kind" in done.stderr and "broken.json: unreadable" in done.stderr
    assert done.stderr.count("report: skipped") == 2  # side files (hypergraph.json, check.json...) are owned
    assert "Attack success rate" in html and "Recovery rate" in html  # Table 2 columns
    # figures: spectrum + gap, rig maps (2) + compare, weights depth/esd/filters, jaccard, training curves
    assert html.count("data:image/png;base64,") >= 10 and "src=\"figures/" not in html
    for link in [line for line in md.splitlines() if line.startswith("![")]:
        assert (tmp_path / "report" / link.split("(")[1].rstrip(")")).is_file(), link


def test_report_names_a_missing_figure_and_a_folder_that_is_no_run(paper, tmp_path):
    root, ckpts, _run = paper
    _ok("svd-profile", ckpts[0], "--data", root / "shards", "--workers", "0", "--per-class", "1", "--layers", "fc",
        "--quiet", "--out", tmp_path / "p")
    (tmp_path / "p" / "jaccard.png").unlink()
    done = _ok("report", tmp_path / "p", "--runs", tmp_path / "p", "--out", tmp_path / "r")
    assert "jaccard.png: figure listed by" in done.stderr and "no metrics.jsonl" in done.stderr
    assert "<h2>SVD profile" in (tmp_path / "r" / "report.html").read_text()


def test_report_with_nothing_to_render_is_a_clean_error(tmp_path):
    (tmp_path / "x.json").write_text("[]")
    res = CliRunner().invoke(main, ["report", str(tmp_path), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "nothing to report" in res.output and "Traceback" not in res.output


def _rows(top1_by_rank):
    return [{"rank": k, "top1": t} for k, t in top1_by_rank]


def test_spectrum_table_shows_every_requested_rank():
    series = {"a": _rows([(k, k / 10) for k in range(7)]), "b": _rows([(k, 0.5) for k in range(7)])}
    table = spectrum_table(series)
    assert [r["rank"] for r in table.rows] == [0, 1, 2, 3, 4, 5, 6] and "every requested rank" in table.caption


def test_spectrum_table_with_many_ranks_keeps_every_change_and_the_endpoints():
    n = SPECTRUM_ALL_RANKS + 15
    a = [(k, 0.1 if k < 5 else 0.6) for k in range(n)]        # changes at 5
    b = [(k, 0.2 if k not in (17, 18) else 0.3) for k in range(n)]  # changes at 17 and back at 19
    table = spectrum_table({"a": _rows(a), "b": _rows(b)})
    assert [r["rank"] for r in table.rows] == [0, 5, 17, 19, n - 1]
    assert f"5 of {n} requested ranks" in table.caption and "changes" in table.caption
    assert table.rows[1] == {"rank": 5, "a": "60.00%", "b": "20.00%"}
