"""rankshard-evaluate robustness: eps sweeps with PGD / APGD / AutoAttack. Guarantees by construction (robust
accuracy non-increasing in eps; AutoAttack after PGD <= PGD), batch independence, CLI outputs, report section,
a foreign Wide-ResNet-50-2 evaluated, normalization options."""
import csv
import json

import pytest
import torch
from click.testing import CliRunner

from evaluate_demo import demo_shards, tiny_attack_setup, tiny_checkpoint
from rankshard.evaluate.checkpoints import LoadedCheckpoint
from rankshard.evaluate.cli import main
from rankshard.evaluate.data import tensor_data
from rankshard.evaluate.distributed import DistContext
from rankshard.evaluate.errors import EvaluationError
from rankshard.evaluate.sweep import SweepConfig, parse_eps_list, run_robustness, summarize_sweep, sweep_records
from rankshard.evaluate.tables import eps_label
from rankshard.train.autoattack import AttackBudget
from rankshard.train.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = DistContext(0, 1, "cpu")
SMALL = AttackBudget(pgd_steps=5, apgd_steps=10, n_target_classes=3, square_queries=30, fab_steps=5)


@pytest.fixture(scope="module")
def tiny():
    return tiny_attack_setup(14, 16, 2)


def _sweep(tiny, cfg, batch_size=14):
    model, x, y = tiny
    return sweep_records(model, tensor_data(x, y, 10, batch_size=batch_size).batches(), cfg, "cpu")


def test_robust_accuracy_never_increases_with_eps_and_aa_after_pgd_never_exceeds_pgd(tiny):
    cfg = SweepConfig(parse_eps_list("0,1/255,2/255,4/255,8/255"), ("pgd", "aa"), "linf", 0, SMALL)
    records = _sweep(tiny, cfg)
    rows = summarize_sweep(records, cfg)
    for attack in ("pgd", "aa"):
        acc = [r["robust_accuracy"] for r in rows if r["attack"] == attack]
        assert acc == sorted(acc, reverse=True) and acc[0] == pytest.approx(12 / 14)  # eps 0 = clean top-1
    pgd = {r["eps"]: r["robust_accuracy"] for r in rows if r["attack"] == "pgd"}
    assert all(r["robust_accuracy"] <= pgd[r["eps"]] for r in rows if r["attack"] == "aa")
    for rec in records.values():  # per sample too: a point robust to AA at eps is robust to PGD and at eps' < eps
        for group in ("pgd", "aa"):
            ok = [a == rec["label"] and rec["clean"] == rec["label"] for a in rec[group]["adv"]]
            assert ok == sorted(ok, reverse=True)
        assert all(not a or p for a, p in zip([x == rec["label"] for x in rec["aa"]["adv"]],
                                              [x == rec["label"] for x in rec["pgd"]["adv"]]))
    assert max(r["max_delta"] - r["eps"] for r in rows) <= 1e-6  # every adversarial point inside its ball


def test_sweep_does_not_depend_on_batching(tiny):
    cfg = SweepConfig((0.0, 2 / 255), ("apgd-ce", "square"), "linf", 3, SMALL)
    one, many = _sweep(tiny, cfg, 14), _sweep(tiny, cfg, 4)
    assert {k: (r["apgd-ce"]["adv"], r["square"]["adv"]) for k, r in one.items()} == \
           {k: (r["apgd-ce"]["adv"], r["square"]["adv"]) for k, r in many.items()}


def test_l2_sweep_and_aa_notes(tiny, tmp_path):
    model, x, y = tiny
    cfg = SweepConfig((0.0, 0.25), ("aa",), "l2", 0, SMALL)
    ck = LoadedCheckpoint("tiny", "tiny.pt", model, 10, None, "?")
    rows = run_robustness([ck], tensor_data(x, y, 10), cfg, CPU, tmp_path, quiet=True)
    body = json.loads((tmp_path / "robustness.json").read_text())
    assert body["kind"] == "robustness" and body["attack"]["sequences"] == {"aa": ["apgd-ce", "apgd-t"]}
    assert "not run (l2 not implemented): fab-t, square" in body["attack"]["notes"]["aa"]
    assert body["figures"] == ["robustness.png"] and (tmp_path / "robustness.png").stat().st_size > 0
    assert [r["eps"] for r in rows] == [0.0, 0.25]


@pytest.mark.parametrize("eps,attacks,norm,message", [
    ("0,8/255,4/255", "aa", "linf", "ascending order"), ("0,8", "aa", "linf", "exceeds the [0, 1] pixel range"),
    ("0,1/255", "fgsm", "linf", "unknown attack 'fgsm'"), ("0,0.5", "square", "l2", "only L-inf")])
def test_bad_sweep_options_are_clear_errors(eps, attacks, norm, message):
    with pytest.raises(EvaluationError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SweepConfig(parse_eps_list(eps), tuple(attacks.split(",")), norm)


def test_eps_labels():
    assert [eps_label(e, "linf") for e in parse_eps_list("0,1/255,8/255,0.01")] == ["0", "1/255", "8/255", "0.01"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    demo_shards(root / "shards", 2, shard_size=10)
    return root


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _common(root, out):
    return ["--data", root / "shards", "--out", out, "--device", "cpu", "--workers", "0", "--batch-size", "8",
            "--limit", "12", "--quiet"]


def test_cli_sweep_writes_csv_json_figure_and_report_shows_curves(shards, tmp_path):
    a, b = tiny_checkpoint(tmp_path / "a.pt", 0), tiny_checkpoint(tmp_path / "b.pt", 1)
    code, out = _run("robustness", f"a={a}", f"b={b}", *_common(shards, tmp_path / "rob"), "--eps", "0,2/255,8/255",
                     "--attack", "pgd,aa", "--pgd-steps", "3", "--apgd-steps", "5", "--square-queries", "10",
                     "--target-classes", "2", "--fab-steps", "3")
    assert code == 0, out
    assert "| eps | a (pgd) | a (aa) | b (pgd) | b (aa) |" in out and "| 8/255 |" in out
    rows = list(csv.DictReader(open(tmp_path / "rob" / "robustness.csv")))
    assert len(rows) == 2 * 2 * 3 and {"robust_accuracy", "attack_success", "recovery"} <= set(rows[0])
    samples = list(csv.DictReader(open(tmp_path / "rob" / "robustness-a-samples.csv")))
    assert len(samples) == 12 and "aa@0.0313725_by" in samples[0]
    code, out = _run("report", tmp_path / "rob", "--out", tmp_path / "report")
    assert code == 0, out
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Robust accuracy vs eps" in md and "robustness.png" in md
    assert "aa: apgd-ce -> apgd-t -> fab-t -> square" in md


def test_cli_evaluates_a_torchvision_wide_resnet50_2_state_dict(shards, tmp_path):
    torch.manual_seed(0)
    torch.save(build_model("wide_resnet50_2", "imagenet", 10, 8).state_dict(), tmp_path / "wrn50.pth")
    code, out = _run("robustness", tmp_path / "wrn50.pth", *_common(shards, tmp_path / "o"), "--eps", "0,1/255",
                     "--attack", "apgd-ce", "--apgd-steps", "2", "--allow-size-mismatch", "--normalization", "imagenet")
    assert code == 0, out
    body = json.loads((tmp_path / "o" / "robustness.json").read_text())
    assert [r["count"] for r in body["rows"]] == [12, 12]


def test_cli_refuses_a_bogus_state_dict_and_half_normalization(shards, tmp_path):
    torch.save({"features.0.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "vgg.pth")
    code, out = _run("robustness", tmp_path / "vgg.pth", *_common(shards, tmp_path / "o"))
    assert code == 2 and "no architecture rankshard knows" in out and "features" in out and "Traceback" not in out
    a = tiny_checkpoint(tmp_path / "a.pt", 0)
    code, out = _run("robustness", a, *_common(shards, tmp_path / "o"), "--mean", "0.5,0.5,0.5")
    assert code == 2 and "--mean and --std go together" in out
