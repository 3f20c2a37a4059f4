"""--estimate: the real pipeline on one SVD batch spread over the split, scaled to the whole split."""
from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main
from rankshard.preprocess.estimate import Estimate, estimate_split
from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.spec import ShardSpec

N = 60


def _source() -> ArraySource:
    images, labels = labelled_images(N // 10, seed=6)
    info = {"kind": "test", "path": "memory", "fingerprint": "estimate", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(N)], tuple("abcdefghij"), info)


def _spec(**kw) -> ShardSpec:
    return ShardSpec("cifar10", "train", **{"ranks": (3, 8), "high": (2,), "factors": 4, "shard_size": N,
                                            "batch_size": N, "workers": 0, "backend": "gram64", **kw})


def test_a_sample_of_the_whole_split_predicts_the_bytes_exactly(tmp_path):
    """One batch holding every image, in the run's (shuffled) order: the sample's shard is the run's shard."""
    est = estimate_split(_source(), _spec(), tmp_path / "est")
    assert est.sample == est.images == N and not (tmp_path / "est").exists()
    assert (est.processes, est.ranks, est.device) == (1, 1, "cpu")
    assert 0 < est.free_bytes <= shutil.disk_usage(tmp_path).total
    result = materialize_split(_source(), _spec(), tmp_path / "run", show_progress=False)
    written = {name: sum(s["bytes"] for s in m["shards"]) for name, m in result["manifests"].items()}
    assert {name: round(b * N) for name, b in est.bytes_per_image.items()} == written
    assert est.total_bytes == pytest.approx(sum(written.values()), rel=1e-12)


def test_the_sample_is_one_batch_spread_over_the_output_order(tmp_path, monkeypatch):
    from rankshard.preprocess import estimate as module

    seen = {}
    real = module.materialize_split

    def spy(sample, spec, out, **kw):
        seen["indices"], seen["spec"] = sample.indices.tolist(), spec
        return real(sample, spec, out, **kw)

    monkeypatch.setattr(module, "materialize_split", spy)
    est = estimate_split(_source(), _spec(batch_size=7), tmp_path)
    order = module.sample_order(N, _spec()).tolist()
    assert seen["indices"] == [order[i] for i in (0, 10, 20, 30, 39, 49, 59)]  # round(linspace(0, 59, 7))
    assert (seen["spec"].workers, seen["spec"].shard_size, seen["spec"].shuffle) == (0, 7, False)
    assert est.sample == 7 and est.images == N


def test_the_time_is_a_lower_bound_over_the_processes():
    per = {"decode": 0.01, "svd": 0.02, "encode_write": 0.03}
    cpu = Estimate("d", "s", 1000, 10, 0, {"full": 1.0}, per, "cpu", processes=4)
    assert abs(cpu.wall_seconds - 1000 * 0.06 / 4) < 1e-9
    gpu = Estimate("d", "s", 1000, 10, 0, {"full": 1.0}, per, "cuda", processes=4)
    assert abs(gpu.wall_seconds - 1000 * max(0.02, 0.04 / 4)) < 1e-9  # the GPU is the slower side here
    eight = Estimate("d", "s", 1000, 10, 0, {"full": 1.0}, per, "cuda", processes=4, ranks=8)
    assert abs(eight.wall_seconds - 1000 / 8 * 0.02) < 1e-9  # torchrun: each rank its GPU and 1/8 of the shards


def test_the_cli_prints_the_estimate_and_writes_no_shards(tmp_path):
    from rankshard.preprocess.demo import build_demo_archive

    archive = build_demo_archive(tmp_path / "src", per_class=3, test_per_class=2)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["cifar10", "--source", str(archive), "--no-verify-md5", "--out", str(out),
                                       "--ranks", "3", "--batch-size", "8", "--workers", "0", "--estimate"])
    assert result.exit_code == 0, result.output
    assert "cifar10/train: 30 images; measured on 8 of them" in result.output
    assert "cifar10/test: 20 images; measured on 8 of them" in result.output
    assert "rank-003" in result.output and "free at --out" in result.output and "at least" in result.output
    assert not out.exists()


def test_the_measurement_runs_as_one_worker_does_on_one_thread_after_a_warm_up(tmp_path, monkeypatch):
    """A CPU worker runs torch on one thread: timing the sample on every core would make the estimate too low."""
    import torch

    from rankshard.preprocess import pipeline

    threads, sizes = [], []
    real = pipeline.decompose

    def spy(engine, ctx, positions, loaded):
        threads.append(torch.get_num_threads())
        sizes.append(len(positions))
        return real(engine, ctx, positions, loaded)

    monkeypatch.setattr(pipeline, "decompose", spy)
    before = torch.get_num_threads()
    estimate_split(_source(), _spec(batch_size=20), tmp_path)
    assert threads == [1, 1] and sizes == [8, 20]  # the warm-up, then the measured batch
    assert torch.get_num_threads() == before


def test_a_split_half_written_counts_what_is_there_against_the_free_space(tmp_path, monkeypatch):
    from collections import namedtuple

    from rankshard.preprocess import estimate as module

    materialize_split(_source(), _spec(shard_size=20), tmp_path, show_progress=False)
    for tar in (tmp_path / "cifar10" / "train").glob("*/train-000002.tar"):
        tar.unlink()  # as if the run stopped before its last shard
    written = sum(p.stat().st_size for p in tmp_path.rglob("*.tar"))
    est = estimate_split(_source(), _spec(), tmp_path)
    assert est.written_bytes == written
    usage = namedtuple("usage", "total used free")
    rest = est.total_bytes - written
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: usage(0, 0, int(rest) + 1))
    assert estimate_split(_source(), _spec(), tmp_path).fits is True   # the whole split would not fit, the rest does
    monkeypatch.setattr(module.shutil, "disk_usage", lambda path: usage(0, 0, int(rest) - 1))
    assert estimate_split(_source(), _spec(), tmp_path).fits is False


def test_the_printed_time_is_rounded_down_as_a_lower_bound_must_be():
    from rankshard.preprocess.estimate import _duration

    assert [_duration(s) for s in (32.9, 119.9, 179.0, 3599.0, 7322.0)] == ["32 s", "119 s", "2 min", "59 min",
                                                                          "2 h 02 min"]
