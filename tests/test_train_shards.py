"""rankshard-train end to end on demo shards (materialized from rankshard.preprocess.sources.synth) through the loaders."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.sources.synth import CIFAR10_CLASSES, labelled_images
from rankshard.train import rundir
from rankshard.train.checkpoint import load_checkpoint, model_from_checkpoint
from rankshard.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """cifar10 train (300 images, 16x16) and test (100) splits with variants full and rank-003."""
    out = tmp_path_factory.mktemp("shards")
    for split, per_class, seed in (("train", 30, 0), ("test", 10, 1)):
        images, labels = labelled_images(per_class, (16, 16), seed)
        source = ArraySource(images, labels, [f"{split}/{i}" for i in range(len(labels))], CIFAR10_CLASSES,
                             {"kind": "synthetic", "fingerprint": f"synth-{split}-{per_class}-{seed}"})
        spec = ShardSpec("cifar10", split, ranks=(3,), spectra=False, shard_size=64, workers=0, backend="numpy",
                         shuffle=split == "train")
        materialize_split(source, spec, out, show_progress=False)
    return out


def _args(shards, run_dir, *extra):
    return ["--preset", "cifar10-fast", "--data", str(shards), "--out", str(run_dir), "--arch", "resnet18",
            "--width", "8", "--epochs", "3", "--batch-size", "50", "--lr", "0.2", "--warmup-epochs", "0.5",
            "--workers", "0", "--log-every", "3", "--device", "cpu", "--extra-variants", "rank-003", *extra]


def test_cli_trains_on_shards_above_chance(shards, tmp_path):
    result = CliRunner().invoke(main, _args(shards, tmp_path / "run"))
    assert result.exit_code == 0, result.output
    records = rundir.read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [1, 2, 3] and records[-1]["step"] == 3 * 6  # 300 // 50 steps
    full = records[-1]["eval"]["full"]
    assert full["n"] == 100 and full["top1"] > 0.3  # chance: 0.1
    assert records[-1]["eval"]["rank-003"]["n"] == 100
    model, payload = model_from_checkpoint(tmp_path / "run" / "best.pt")
    assert payload["data"]["classes"] == list(CIFAR10_CLASSES) and payload["data"]["train_manifest_hash"]
    assert payload["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])
    assert (tmp_path / "run" / "curves.png").is_file() and "done: best full top-1" in result.output


def test_cli_resume_after_stop_matches_straight_run(shards, tmp_path):
    straight = CliRunner().invoke(main, _args(shards, tmp_path / "a", "--epochs", "2"))
    assert straight.exit_code == 0, straight.output
    first = CliRunner().invoke(main, _args(shards, tmp_path / "b", "--epochs", "2", "--stop-after-epochs", "1"))
    assert first.exit_code == 0 and "--resume" in first.output
    again = CliRunner().invoke(main, _args(shards, tmp_path / "b", "--epochs", "2"))
    assert again.exit_code == 2 and "--resume" in again.output  # same folder, not asked to resume
    resumed = CliRunner().invoke(main, ["--resume", str(tmp_path / "b"), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = CliRunner().invoke(main, ["--resume", str(tmp_path / "b"), "--lr", "0.5"])
    assert changed.exit_code == 2 and "lr: 0.2 (saved) -> 0.5" in changed.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes_on_shards(shards, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rankshard.train", *_args(shards, tmp_path / "ddp", "--epochs", "2")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = rundir.read_metrics(tmp_path / "ddp")
    assert [r["epoch"] for r in records] == [1, 2] and records[-1]["step"] == 2 * 6
    assert records[-1]["train"]["images"] == 300 and records[-1]["eval"]["full"]["n"] == 100


def test_damaged_last_pt_offers_the_previous_state_and_resumes_from_it(shards, tmp_path):
    straight = CliRunner().invoke(main, _args(shards, tmp_path / "a", "--epochs", "3"))
    assert straight.exit_code == 0, straight.output
    first = CliRunner().invoke(main, _args(shards, tmp_path / "b", "--epochs", "3", "--stop-after-epochs", "2"))
    assert first.exit_code == 0, first.output
    run = tmp_path / "b"
    assert load_checkpoint(run / "last.prev.pt")["epoch"] == 1 and load_checkpoint(run / "last.pt")["epoch"] == 2
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn copy / failing disk
    refused = CliRunner().invoke(main, ["--resume", str(run), "--workers", "0"])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "truncated or corrupt" in refused.output and f"--resume {run} --resume-from last.prev.pt" in refused.output
    resumed = CliRunner().invoke(main, ["--resume", str(run), "--resume-from", "last.prev.pt", "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_sigterm_to_the_whole_process_group_saves_and_resumes_exactly(shards, tmp_path):
    """Cluster preemption (SLURM, torchrun's agent) signals every process of the job, DataLoader workers too.
    The workers must outlive the signal until the main process has saved last.pt: before the fix they died
    at once and the trainer crashed with "DataLoader worker ... killed by signal" and saved nothing."""
    straight = CliRunner().invoke(main, _args(shards, tmp_path / "a"))
    assert straight.exit_code == 0, straight.output
    cmd = [sys.executable, "-m", "rankshard.train", *_args(shards, tmp_path / "b", "--workers", "2", "--log-every", "1")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a batch job has
    try:
        for line in proc.stdout:  # wait until training is under way, loader workers running
            if line.startswith("epoch 1/3 step 2/6"):
                os.killpg(proc.pid, signal.SIGTERM)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # exit 75 (EX_TEMPFAIL): saved but not finished, so `train && evaluate` stops and a requeue script can tell
    assert proc.returncode == 75 and "Traceback" not in err, err[-3000:]
    assert "stopped in epoch 1" in out and "error: stopped by a signal in epoch 1" in err
    assert f"continue with --resume {tmp_path / 'b'}" in err
    step = load_checkpoint(tmp_path / "b" / "last.pt")["step"]
    assert 2 <= step < 6
    stopped = json.loads((tmp_path / "b" / "stopped.json").read_text())  # what a script under torchrun tests
    assert (stopped["epoch"], stopped["step"]) == (0, step)
    resumed = CliRunner().invoke(main, ["--resume", str(tmp_path / "b"), "--workers", "0"])
    assert resumed.exit_code == 0, resumed.output
    assert not (tmp_path / "b" / "stopped.json").exists()
    a, b = (load_checkpoint(tmp_path / d / "last.pt")["state_dict"] for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)
