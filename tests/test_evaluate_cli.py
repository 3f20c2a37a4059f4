"""rankshard-evaluate CLI: outputs of each subcommand, clean errors for bad input, DDP under torchrun."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evaluate_demo import demo_shards, tiny_checkpoint
from rankshard.evaluate.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Demo shards (60 test images in 3 shards) and untrained width-4 checkpoints: plumbing, not accuracy."""
    root = tmp_path_factory.mktemp("cli")
    demo_shards(root / "shards", 6, shard_size=25)
    ckpts = {}
    for name, kw in (("a", {}), ("b", {}), ("five", {"num_classes": 5}), ("big", {"variant": "imagenet"})):
        ckpts[name] = tiny_checkpoint(root / f"{name}.pt", len(ckpts), **kw)
    return root, ckpts


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _common(root, out):
    return ["--data", root / "shards", "--out", out, "--device", "cpu", "--workers", "0", "--batch-size", "16"]


def test_accuracy_spectrum_pgd_report(setup, tmp_path):
    root, ck = setup
    code, out = _run("accuracy", f"a={ck['a']}", f"b={ck['b']}", *_common(root, tmp_path / "acc"),
                     "--variant", "full", "--variant", "rank-003")
    assert code == 0, out
    rows = list(csv.DictReader(open(tmp_path / "acc" / "accuracy.csv")))
    assert [(r["checkpoint"], r["data"], r["count"]) for r in rows] == [
        ("a", "cifar10/test/full", "60"), ("b", "cifar10/test/full", "60"),
        ("a", "cifar10/test/rank-003", "60"), ("b", "cifar10/test/rank-003", "60")]
    code, out = _run("spectrum", ck["a"], ck["b"], *_common(root, tmp_path / "spec"), "--ranks", "0:32:8",
                     "--limit", "30", "--svd-backend", "torch")
    assert code == 0, out
    body = json.loads((tmp_path / "spec" / "spectrum-low-a.json").read_text())
    assert [r["rank"] for r in body["rows"]] == [0, 8, 16, 24, 32] and body["rows"][0]["count"] == 30
    assert (tmp_path / "spec" / "spectrum-low.png").exists() and (tmp_path / "spec" / "spectrum-low-gap.png").exists()
    code, out = _run("pgd", ck["a"], *_common(root, tmp_path / "pgd"), "--eps", "8/255", "--steps", "2", "--limit", "10")
    assert code == 0, out
    assert "targeted PGD-2, linf eps=0.031373 (8.00/255)" in out and "| a | full |" in out
    samples = list(csv.DictReader(open(tmp_path / "pgd" / "pgd-a-samples.csv")))
    assert len(samples) == 10 and set(samples[0]) == {"key", "label", "target", "clean", "adv", "delta"}
    code, out = _run("report", tmp_path, "--out", tmp_path / "report")
    assert code == 0, out
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Top-5" in html and "Recovery rate" in html


@pytest.mark.parametrize("args,message", [
    (["pgd", "{a}", "--eps", "4"], "did you mean 4/255"),
    (["pgd", "{a}", "--eps", "4//255"], "fraction such as '4/255'"),
    (["spectrum", "{a}", "--ranks", "0:40"], "rank 33 is outside the image"),
    (["spectrum", "{a}", "--ranks", "5-9"], "inclusive range 'A:B'"),
    (["accuracy", "{five}"], "predicts 5 classes but cifar10/test/full has 10"),
    (["accuracy", "{big}"], "built for 224x224 inputs but cifar10/test/full holds 32x32"),
    (["accuracy", "{a}", "--variant", "rank-099"], "rank-099"),
    (["accuracy", "missing.pt"], "missing.pt: no such file"),
    (["pgd", "{a}", "--limit", "0"], "'--limit': 0 is not in the range x>=1"),
    (["spectrum", "{a}", "--svd-backend", "bogus"], "'bogus' is not one of 'auto', 'numpy'"),
    # attack budgets are checked before any data is read, not at the first eps > 0 as a traceback
    (["robustness", "{a}", "--attack", "pgd", "--pgd-steps", "-2"], "--attack pgd: check --pgd-steps"),
    (["robustness", "{a}", "--attack", "aa", "--apgd-steps", "0"], "--attack apgd-ce: check --apgd-steps"),
    (["robustness", "{a}", "--attack", "apgd-t", "--target-classes", "0"], "check --apgd-steps, --target-classes"),
    (["robustness", "{a}", "--attack", "square", "--square-queries", "0"], "--attack square: check --square-queries"),
    (["robustness", "{a}", "--attack", "fab-t", "--fab-steps", "0"], "--attack fab-t: check --fab-steps"),
])
def test_bad_input_is_a_clean_error(setup, tmp_path, args, message):
    root, ck = setup
    args = [a.format(**ck) for a in args]
    code, out = _run(*args, *_common(root, tmp_path))
    assert code == 2 and message in out and "Traceback" not in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the backend runs where CUDA is present")
@pytest.mark.parametrize("command,extra", [("spectrum", ["--batch-size", "16", "--limit", "2"]),
                                           ("rig", ["--index", "0:1"])])
def test_a_backend_this_device_cannot_run_is_a_clean_error(setup, tmp_path, command, extra):
    root, ck = setup
    code, out = _run(command, ck["a"], "--data", root / "shards", "--out", tmp_path, "--device", "cpu",
                     "--svd-backend", "torch-gesvdj", *extra)
    assert code == 2 and "--svd-backend torch-gesvdj: " in out and "usable here" in out, out


@pytest.mark.parametrize("option", ["--batch-size", "--limit"])
def test_zero_batch_size_or_limit_names_the_option(setup, tmp_path, option):
    root, ck = setup
    code, out = _run("accuracy", ck["a"], "--data", root / "shards", "--out", tmp_path, option, "0")
    assert code == 2 and f"'{option}': 0 is not in the range x>=1" in out, out


def test_size_mismatch_can_be_allowed(setup, tmp_path):
    root, ck = setup
    code, out = _run("accuracy", ck["big"], *_common(root, tmp_path), "--allow-size-mismatch", "--limit", "5")
    assert code == 0, out


@pytest.mark.slow
def test_torchrun_two_processes_match_one(setup, tmp_path):
    """Real DDP: two gloo processes under torchrun give the same per-sample PGD and spectrum results."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this python")
    root, ck = setup
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"n{nproc}"
        for sub in (["pgd", "--steps", "3", "--eps", "8/255", "--delta-rank"], ["spectrum", "--ranks", "0:32:4", "--svd-backend", "torch"]):
            cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "rankshard.evaluate", sub[0], ck["a"],
                   *map(str, _common(root, out)), *sub[1:], "--limit", "37"]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
            assert done.returncode == 0, done.stderr[-3000:]
        outputs[nproc] = out
    for name in ("pgd-a-samples.csv", "spectrum-low-a-samples.csv", "spectrum-low-a.csv"):
        one = list(csv.DictReader(open(outputs[1] / name)))
        two = list(csv.DictReader(open(outputs[2] / name)))
        assert len(one) in (37, 9) and [_same_attack(r) for r in one] == [_same_attack(r) for r in two], name
    # every rank's perturbation curves arrive under their own keys (the attack itself matches up to float rounding
    # across batch shapes, hence the tolerance; a curve under the wrong key would differ by far more)
    one, two = (np.load(outputs[n] / "pgd-a-delta-rank.npz") for n in (1, 2))
    assert list(one["keys"]) == list(two["keys"]) and len(one["keys"]) == 37
    np.testing.assert_allclose(one["in_image"], two["in_image"], atol=1e-2)


def _same_attack(row: dict) -> dict:
    """A per-sample PGD row without the perturbation's measured sizes (float rounding differs by batch shape)."""
    return {k: ("" if k.startswith("delta") else v) for k, v in row.items()}


def test_a_damaged_shard_stops_evaluation_unless_verification_is_off(setup, tmp_path):
    root, ck = setup
    shards = tmp_path / "shards"
    shutil.copytree(root / "shards", shards)
    (shard,) = [p for p in (shards / "cifar10/test/full").glob("*.tar") if p.name.endswith("000001.tar")]
    data = bytearray(shard.read_bytes())
    data[-2048] ^= 0xFF  # in the zero padding before the end-of-archive marker: every sample still decodes
    shard.write_bytes(bytes(data))
    args = ["accuracy", f"a={ck['a']}", "--data", shards, "--out", tmp_path / "o", "--device", "cpu", "--workers", "0"]
    code, out = _run(*args)
    assert code == 2 and f"{shard.name}: sha256" in out and "Traceback" not in out
    code, out = _run(*args, "--no-verify-shards")
    assert code == 0, out
    rig = ["rig", ck["a"], "--data", shards, "--index", "0:1", "--methods", "vanilla", "--out", tmp_path / "r",
           "--device", "cpu", "--quiet"]
    code, out = _run(*rig)
    assert code == 2 and f"{shard.name}: sha256" in out
    code, out = _run(*rig, "--no-verify-shards")
    assert code == 0, out
