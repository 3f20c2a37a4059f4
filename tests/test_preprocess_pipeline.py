import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

from rankshard.preprocess.cli import main
from rankshard.preprocess.rank.engine import reference_low_rank
from rankshard.preprocess.errors import ConfigMismatchError, LockedError, RankshardError
from rankshard.preprocess.locking import exclusive_lock
from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.verify import verify_tree
from rankshard.preprocess.sources.cifar import write_cifar10_archive

REPO = Path(__file__).resolve().parents[1]


def _source(per_class=10, seed=0):
    images, labels = labelled_images(per_class, seed=seed)
    info = {"kind": "test", "path": "memory", "fingerprint": f"synth-{per_class}-{seed}", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(len(labels))], tuple("abcdefghij"), info)


def _spec(**kw):
    base = dict(dataset="cifar10", split="train", ranks=(1, 5), high=(2,), factors=4, shard_size=30, workers=0)
    return ShardSpec(**{**base, **kw})


def _tar_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    result = materialize_split(_source(), _spec(), out, show_progress=False)
    return out, result


def test_layout_and_manifest(built):
    out, result = built
    split = out / "cifar10" / "train"
    assert sorted(p.name for p in split.iterdir() if p.is_dir()) == [
        "factors-004", "full", "high-002", "rank-001", "rank-005", "spectra"]
    m = json.loads((split / "rank-005" / "manifest.json").read_text())
    assert m["format"] == "rankshard/1" and m["num_samples"] == 100 and m["rank"] == 5 and m["mode"] == "low"
    assert [s["name"] for s in m["shards"]] == [f"train-{i:06d}.tar" for i in range(4)]
    assert [s["num_samples"] for s in m["shards"]] == [30, 30, 30, 10]
    assert m["class_counts"] == [10] * 10 and m["image_size"] == [32, 32]
    assert m["encoding"] == "png" and m["png_compress_level"] == 1
    assert 0 < m["quantization"]["leak_mean"] < 0.05 and m["svd"]["backend"] != "auto"
    assert len(m["config_hash"]) == 16 and m["config"]["ranks"] == [1, 5]


def test_plain_webdataset_and_tarfile_read_the_same_samples(built):
    out, _ = built
    folder = out / "cifar10" / "train" / "rank-005"
    urls = [str(p) for p in sorted(folder.glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("rgb")
    samples = list(ds)
    assert len(samples) == 100
    first = samples[0]
    with tarfile.open(urls[0]) as tar:
        png = tar.extractfile(f"{first['__key__']}.png").read()
    import io
    pil = np.asarray(Image.open(io.BytesIO(png))).astype(np.float32) / 255
    assert np.allclose(first["png"], pil)
    assert first["json"]["rank"] == 5 and int(first["cls"]) == first["json"]["label"]


def test_keys_join_across_variants_and_values_match_reference(built):
    out, _ = built
    split = out / "cifar10" / "train"
    by_variant = {v: {s["__key__"]: s for s in wds.WebDataset(str(split / v / "train-000000.tar"),
                                                              shardshuffle=False).decode("rgb")}
                  for v in ("full", "rank-005", "high-002", "factors-004")}
    keys = list(by_variant["full"])
    assert all(list(d) == keys for d in by_variant.values())
    key = keys[3]
    x = by_variant["full"][key]["png"].transpose(2, 0, 1)[None].astype(np.float64)
    low = np.clip(reference_low_rank(x, 5)[0], 0, 1).transpose(1, 2, 0)
    assert np.abs(by_variant["rank-005"][key]["png"] - low).max() <= 0.5 / 255 + 1e-4
    high = (x - reference_low_rank(x, 2))[0].transpose(1, 2, 0)
    assert np.abs(by_variant["high-002"][key]["npy"].astype(np.float64) - high).max() < 1.5e-3
    f = by_variant["factors-004"][key]
    assert f["u.npy"].shape == (3, 32, 4) and f["s.npy"].shape == (3, 4) and f["v.npy"].shape == (3, 32, 4)


def test_train_order_is_a_seeded_mix_and_test_keeps_source_order(built, tmp_path):
    out, _ = built
    labels = [s["json"]["label"] for s in wds.WebDataset(
        str(out / "cifar10/train/full/train-000000.tar"), shardshuffle=False).decode()]
    assert len(set(labels)) >= 8 and labels != sorted(labels)
    materialize_split(_source(2), _spec(split="test", shuffle=False, ranks=(1,), high=(), factors=None),
                      tmp_path, show_progress=False)
    test = list(wds.WebDataset(str(tmp_path / "cifar10/test/full/test-000000.tar"), shardshuffle=False).decode())
    assert [s["json"]["source"] for s in test] == [f"mem:{i}" for i in range(20)]


def test_rerun_is_byte_identical_and_verify_passes(built, tmp_path):
    out, _ = built
    materialize_split(_source(), _spec(workers=1), tmp_path, show_progress=False)
    assert _tar_bytes(tmp_path) == _tar_bytes(out)
    report = verify_tree(tmp_path)
    assert report.ok, [c.problems for c in report.checks]


def test_on_cpu_the_workers_make_whole_shards(built, tmp_path, monkeypatch):
    """With workers on CPU, SVD and encoding both run in the workers, so every core does numeric work: this
    process never decomposes a chunk, and the bytes equal those of the run that did everything in-process."""
    import rankshard.preprocess.pipeline as pipeline
    import rankshard.preprocess.shardtask as shardtask

    handed = []

    class StartedPool(pipeline.WorkerPool):  # started before the job: the main process must hand out every shard
        def __init__(self, n, preload=()):
            super().__init__(n, preload)
            while not all(w.ready for w in self.workers):
                self.poll()
                time.sleep(0.01)

        def submit(self, fn, arg, what):
            handed.append(what)
            return super().submit(fn, arg, what)

    def refuse(*args, **kwargs):
        raise AssertionError("the main process decomposed a chunk")
    monkeypatch.setattr(pipeline, "WorkerPool", StartedPool)
    monkeypatch.setattr(shardtask, "decompose", refuse)  # this process only: spawn workers import their own
    result = materialize_split(_source(), _spec(workers=2), tmp_path, show_progress=False)
    assert len(handed) == 4 and _tar_bytes(tmp_path) == _tar_bytes(built[0])
    assert result["stats"]["svd"] > 0 and result["stats"]["shards_written"] == 4  # timed in the workers


def test_a_job_never_waits_for_workers_that_are_still_starting(built, tmp_path, monkeypatch):
    """Workers take seconds to start (spawn + torch): until one has, this process makes the shards itself.
    Here they never start within the job, so it makes them all, hands none out, and writes the same bytes."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "rankshard_test_slow_start.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.syspath_prepend(str(mods))  # spawn gives the workers this process's sys.path
    import rankshard.preprocess.pipeline as pipeline
    pools = []

    def slow_pool(n, preload=()):
        pools.append(pipeline_pool(n, preload=("rankshard_test_slow_start",)))
        return pools[-1]
    pipeline_pool = pipeline.WorkerPool
    monkeypatch.setattr(pipeline, "WorkerPool", slow_pool)
    result = materialize_split(_source(), _spec(workers=2), tmp_path / "out", show_progress=False)
    assert result["stats"]["shards_written"] == 4
    assert _tar_bytes(tmp_path / "out") == _tar_bytes(built[0])
    assert not any(w.used or w.ready for w in pools[0].workers)
    assert not any(w.process.is_alive() for w in pools[0].workers)  # stopped on the way out, not awaited


def test_verify_detects_corruption(built, tmp_path):
    import shutil

    shutil.copytree(built[0], tmp_path / "copy")
    shard = tmp_path / "copy/cifar10/train/rank-001/train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_tree(tmp_path / "copy")
    assert not report.ok
    assert any("sha256 mismatch" in p for c in report.checks for p in c.problems)


def test_resume_after_partial_run_with_stale_files(built, tmp_path):
    out, _ = built
    materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    folder = tmp_path / "cifar10/train/rank-005"
    (folder / "train-000002.tar").unlink()                      # never written
    (folder / ".progress/train-000001.tar.json").unlink()        # killed between rename and record
    (folder / ".train-000003.tar.partial").write_bytes(b"junk")  # killed mid-write
    result = materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    assert result["stats"]["shards_written"] == 2 and result["stats"]["shards_skipped"] == 2
    assert _tar_bytes(tmp_path) == _tar_bytes(out)
    assert not list(folder.glob(".*.partial"))



@pytest.mark.parametrize("old, new", [
    ('"stats"', '"statr"'),       # one flipped bit in a key: a KeyError when the manifests were written
    ('"bytes": ', '"bytes": 1'),  # a record that does not match its shard: "rerun the same command" said so forever
    (None, "[]"),                 # valid JSON of another shape: an AttributeError
])
def test_a_damaged_shard_record_means_the_shard_is_written_again(built, tmp_path, old, new):
    out, _ = built
    materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    record = tmp_path / "cifar10/train/rank-005/.progress/train-000001.tar.json"
    record.write_text(new if old is None else record.read_text().replace(old, new, 1))
    result = materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    assert result["stats"]["shards_written"] == 1 and _tar_bytes(tmp_path) == _tar_bytes(out)
    assert json.loads(record.read_text())["name"] == "train-000001.tar"


@pytest.mark.parametrize("damage", ['"config_hash"', '"config"', '"backend"'])  # each key's last letter flipped
def test_a_damaged_split_config_is_named_and_deleting_it_resumes(built, tmp_path, damage):
    out, _ = built
    materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    config = tmp_path / "cifar10/train/.rankshard-config.json"
    good = config.read_text()
    config.write_text(good.replace(damage, damage[:-2] + 'X"', 1))
    with pytest.raises(RankshardError, match=r"\.rankshard-config\.json is damaged .*delete that file and rerun"):
        materialize_split(_source(), _spec(), tmp_path, show_progress=False)  # was a KeyError or TypeError
    if damage == '"config"':  # --overwrite starts again, as it does after a configuration that differs
        result = materialize_split(_source(), _spec(), tmp_path, overwrite=True, show_progress=False)
        assert result["stats"]["shards_skipped"] == 0 and _tar_bytes(tmp_path) == _tar_bytes(out)
        config.write_text(good.replace(damage, damage[:-2] + 'X"', 1))
    config.unlink()
    result = materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    assert result["stats"]["shards_written"] == 0 and _tar_bytes(tmp_path) == _tar_bytes(out)

def test_different_config_is_refused_then_overwritten(built, tmp_path):
    materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    with pytest.raises(ConfigMismatchError, match=r"(?s)ranks: \[1, 5\] -> \[1, 7\].*--overwrite"):
        materialize_split(_source(), _spec(ranks=(1, 7)), tmp_path, show_progress=False)
    materialize_split(_source(), _spec(ranks=(1, 7)), tmp_path, overwrite=True, show_progress=False)
    assert (tmp_path / "cifar10/train/rank-007/manifest.json").exists()
    assert not (tmp_path / "cifar10/train/rank-005").exists()


def test_second_concurrent_run_refuses(tmp_path):
    split = tmp_path / "cifar10" / "train"
    split.mkdir(parents=True)
    with exclusive_lock(split / ".lock"):
        with pytest.raises(LockedError, match="being written by another run"):
            materialize_split(_source(), _spec(), tmp_path, show_progress=False)


def _cli_args(archive, out, workers="0"):
    return ["cifar10", "--source", str(archive), "--out", str(out), "--no-verify-md5", "--ranks", "2,5",
            "--high", "3", "--shard-size", "10", "--workers", workers, "--split", "train"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    return write_cifar10_archive(folder / "cifar-10-python.tar.gz", labelled_images(12), labelled_images(2, seed=1))


def test_resume_after_kill_9_is_byte_identical(archive, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert CliRunner().invoke(main, _cli_args(archive, whole)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "rankshard.preprocess", *_cli_args(archive, killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    shards = killed / "cifar10/train/rank-005"
    while time.time() < deadline and len(list(shards.glob("*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (shards / "manifest.json").exists(), "the run finished before it could be killed"
    result = CliRunner().invoke(main, _cli_args(archive, killed))
    assert result.exit_code == 0, result.output
    assert _tar_bytes(killed) == _tar_bytes(whole)
    assert verify_tree(killed).ok


def test_cli_reports_user_errors_without_traceback(archive, tmp_path):
    result = CliRunner().invoke(main, ["cifar10", "--source", str(archive), "--out", str(tmp_path)])
    assert result.exit_code == 2 and "md5" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["cifar10", "--source", str(archive), "--out", str(tmp_path),
                                       "--ranks", "5,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


def test_cli_verify_and_preview(archive, tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, _cli_args(archive, tmp_path)).exit_code == 0
    result = runner.invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 0 and "all variants verified" in result.output
    result = runner.invoke(main, ["preview", str(tmp_path)])
    assert result.exit_code == 0
    grid = tmp_path / "cifar10/train/preview.png"
    assert Image.open(grid).size[0] > 300 and (tmp_path / "cifar10/train/preview-energy.png").exists()
    (tmp_path / "cifar10/train/rank-002/train-000000.tar").unlink()
    result = runner.invoke(main, ["verify", str(tmp_path)])
    assert result.exit_code == 1 and "missing" in result.output


@pytest.mark.parametrize("kw, needle", [
    (dict(ranks=(0, 5)), "--ranks 0: ranks start at 1"),
    (dict(high=(0,)), "--high 0: ranks start at 1"),
    (dict(ranks=(5, 3, 5)), "--ranks: rank 5 is listed twice"),
    (dict(lowpass=(0, 4)), r"--lowpass 0: windows start at 1 \(a 0 x 0 low-pass window keeps no frequency"),
    (dict(highpass=(0,)), r"--highpass 0: windows start at 1 \(a 0 x 0 high-pass window removes nothing"),
    (dict(lowpass=(4, 4)), "--lowpass: window 4 is listed twice"),
])
def test_meaningless_rank_lists_are_refused(kw, needle):
    with pytest.raises(RankshardError, match=needle):
        _spec(**kw)


@pytest.mark.parametrize("kw, needle", [
    (dict(ranks=(5, 32, 1000)), "--ranks 32,1000: on these 32x32 images 32 would store a copy of full"),
    (dict(high=(40,)), "--high 40"),
    (dict(factors=33), "--factors 33"),
])
def test_ranks_beyond_the_image_are_refused_before_anything_is_written(kw, needle, tmp_path):
    with pytest.raises(RankshardError, match=needle):
        materialize_split(_source(per_class=2), _spec(**kw), tmp_path, show_progress=False)
    assert not list(tmp_path.iterdir())  # not even a lock file


def test_resumed_auto_run_keeps_autos_account_in_the_manifest(tmp_path):
    spec = _spec(backend="auto", ranks=(5,), high=(), factors=None)
    materialize_split(_source(per_class=4), spec, tmp_path, show_progress=False)
    manifest = tmp_path / "cifar10/train/rank-005/manifest.json"
    first = json.loads(manifest.read_text())["svd"]
    assert "auto" in first
    (tmp_path / "cifar10/train/rank-005/train-000001.tar").unlink()
    manifest.unlink()
    materialize_split(_source(per_class=4), spec, tmp_path, show_progress=False)
    assert json.loads(manifest.read_text())["svd"] == first


def test_progress_with_rate_and_eta_and_quiet_everywhere(archive, tmp_path):
    runner = CliRunner()
    loud = runner.invoke(main, _cli_args(archive, tmp_path))
    assert loud.exit_code == 0 and "img/s" in loud.stderr and " eta " in loud.stderr
    for command in (["verify", str(tmp_path)], ["preview", str(tmp_path)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 0 and f"{command[0]} [" in result.stderr and " eta " in result.stderr
    for command in (_cli_args(archive, tmp_path / "quiet"), ["verify", str(tmp_path)], ["preview", str(tmp_path)]):
        result = runner.invoke(main, command + ["--quiet"])
        assert result.exit_code == 0 and result.stderr == "", command


def test_strict_is_an_alias_that_cannot_contradict_on_error(tmp_path):
    (tmp_path / "a").mkdir()
    result = CliRunner().invoke(main, ["folder", "--source", str(tmp_path), "--out", str(tmp_path / "o"),
                                       "--strict", "--on-error", "skip"])
    assert result.exit_code == 2 and "--strict means --on-error raise" in result.output


def test_preprocess_command_modules_do_not_import_the_cli_back():
    # cli imports the command modules; were any of them to import cli, the import order would decide what works
    for name in ("options", "cli_cifar", "cli_images", "cli_tools", "demo"):
        source = (REPO / "preprocess" / f"{name}.py").read_text()
        assert "rankshard.preprocess.cli import" not in source and "from rankshard.preprocess import cli" not in source


@pytest.mark.gpu
def test_gpu_numeric_chain_returns_host_arrays_like_the_cpu_one():
    """On CUDA every variant's arrays come back (in one transfer) as numpy arrays of the CPU path's dtypes
    and shapes, equal up to float rounding (cuSOLVER and LAPACK round differently)."""
    from rankshard.preprocess.payloads import make_engine, variant_payloads

    images, _ = labelled_images(4)
    variants = _spec(lowpass=(4,)).variants()
    cpu = variant_payloads(make_engine("auto", "cpu"), variants, images)
    gpu = variant_payloads(make_engine("auto", "cuda"), variants, images)
    for name, arrays in cpu.items():
        for key, ref in arrays.items():
            got = gpu[name][key]
            assert isinstance(got, np.ndarray) and got.dtype == ref.dtype and got.shape == ref.shape, (name, key)
            tol = 1 if ref.dtype == np.uint8 else 2e-3
            assert np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() <= tol, (name, key)


def test_clip_fraction_and_leak_match_a_float64_literal_count():
    """Per image and variant: the share of pixels the stored uint8 clips (x_k < 0 or > 1) and the relative
    error storing adds, ||round(255 clip(x_k)) / 255 - x_k|| / ||x_k||, against numpy float64 over the same
    reconstructions (float32 from the engine: this checks the counting and the norms, not the SVD)."""
    import torch

    from rankshard.preprocess.payloads import make_engine, variant_payloads

    images, _ = labelled_images(3, size=(24, 20))  # rank 2 and 4 of natural images overshoot [0, 1]
    engine = make_engine("gram64", "cpu")
    variants = _spec(ranks=(2, 4)).variants()
    payloads = variant_payloads(engine, variants, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    low = engine.materialize(x, low=[2, 4]).low
    clipped_any = False
    for k in (2, 4):
        xk = low[k].numpy().astype(np.float64).reshape(len(images), -1)
        clip = ((xk < 0) | (xk > 1)).mean(axis=1)
        stored = np.round(255 * np.clip(xk, 0, 1)) / 255
        leak = np.linalg.norm(stored - xk, axis=1) / np.linalg.norm(xk, axis=1)
        got = payloads[f"rank-{k:03d}"]
        np.testing.assert_array_equal(got["clip_fraction"], clip.astype(np.float32))
        np.testing.assert_allclose(got["leak"], leak, rtol=1e-5)
        clipped_any |= bool((clip > 0).any())
    assert clipped_any, "the test images must make some reconstruction leave [0, 1]"
