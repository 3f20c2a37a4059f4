"""The disk-space projection: a run that will not fit stops after the first shard that says so, keeps every
finished shard, and resumes to the same bytes once there is room."""
from __future__ import annotations

from collections import namedtuple

import pytest
from click.testing import CliRunner

from rankshard.preprocess import diskspace
from rankshard.preprocess.cli import main
from rankshard.preprocess.diskspace import OutOfSpaceError, SpaceCheck
from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.spec import ShardSpec
from rankshard.preprocess.verify import verify_tree

Usage = namedtuple("Usage", "total used free")
SHARD, IMAGES = 20, 60  # three shards


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: Usage(free * 2, free, free))


def _source() -> ArraySource:
    images, labels = labelled_images(IMAGES // 10, seed=4)
    info = {"kind": "test", "path": "memory", "fingerprint": "diskspace", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(IMAGES)], tuple("abcdefghij"), info)


def _spec() -> ShardSpec:
    return ShardSpec("cifar10", "train", ranks=(3, 8), shard_size=SHARD, batch_size=SHARD, workers=0, backend="gram64")


def _tars(root) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tar"))}


def test_projection_is_bytes_per_image_so_far_times_images_left(tmp_path, monkeypatch):
    check = SpaceCheck(tmp_path, left=1000, sharing=2)
    _free(monkeypatch, 10**12)
    check.shard_done(100, 5_000)
    check.shard_done(100, 7_000)
    assert check.projected() == pytest.approx(12_000 / 200 * 800 * 2)
    _free(monkeypatch, int(check.projected()))  # exactly enough: carries on
    check.shard_done(0, 0)
    _free(monkeypatch, int(check.projected()) - 1)
    with pytest.raises(OutOfSpaceError, match=r"1,600 images left need about .* free"):
        check.shard_done(0, 0)


def test_shards_being_written_count_back_into_the_free_space(tmp_path, monkeypatch):
    """A worker's half-written shard already took its bytes off the free space while its images are still
    counted as left: without counting them back a run that fits would be stopped."""
    check = SpaceCheck(tmp_path, left=300)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / ".train-000001.tar.partial").write_bytes(b"x" * 4000)
    (tmp_path / "full" / "train-000000.tar").write_bytes(b"x" * 100)  # finished: not in flight
    _free(monkeypatch, 16_000)  # 100 images x 100 bytes written; 200 left need 20,000 = 16,000 free + 4,000
    check.shard_done(100, 10_000)
    assert check.in_flight() == 4000
    (tmp_path / "full" / ".train-000001.tar.partial").write_bytes(b"x" * 3999)
    with pytest.raises(OutOfSpaceError):
        check.shard_done(0, 0)


def test_a_run_that_will_not_fit_stops_after_one_shard_and_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    materialize_split(_source(), _spec(), whole, show_progress=False)
    first = sum(p.stat().st_size for p in whole.rglob("train-000000.tar"))
    need = first / SHARD * (IMAGES - SHARD)  # what the projection says after shard 0

    _free(monkeypatch, int(need) - 1)
    out = tmp_path / "out"
    with pytest.raises(OutOfSpaceError, match="will not fit"):
        materialize_split(_source(), _spec(), out, show_progress=False)
    assert sorted(p.name for p in out.rglob("*.tar")) == ["train-000000.tar"] * 4  # full, rank-003/008, spectra
    assert not list(out.rglob("manifest.json")) and not list(out.rglob(".*.partial"))

    monkeypatch.undo()
    result = materialize_split(_source(), _spec(), out, show_progress=False)
    assert result["stats"]["shards_skipped"] == 1 and _tars(out) == _tars(whole)
    assert verify_tree(out).ok


def test_without_the_check_a_run_carries_on(tmp_path, monkeypatch):
    _free(monkeypatch, 1)
    result = materialize_split(_source(), _spec(), tmp_path, show_progress=False, space_check=False)
    assert result["manifests"] is not None


def test_the_cli_stops_with_the_figures_and_the_way_out(tmp_path, monkeypatch):
    from rankshard.preprocess.demo import build_demo_archive

    archive = build_demo_archive(tmp_path / "src", per_class=2, test_per_class=2)
    _free(monkeypatch, 1)
    args = ["cifar10", "--source", str(archive), "--no-verify-md5", "--split", "test", "--out", str(tmp_path / "o"),
            "--ranks", "3", "--shard-size", "10", "--workers", "0", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "will not fit" in result.output and "--no-space-check" in result.output
    assert "Traceback" not in result.output
    assert CliRunner().invoke(main, args + ["--no-space-check"]).exit_code == 0


def test_the_progress_line_shows_bytes_written_and_the_projected_total(tmp_path, monkeypatch):
    import io

    from rankshard.preprocess.progress import Progress

    _free(monkeypatch, 1)  # not enforced: only the tally
    check = SpaceCheck(tmp_path, left=50_000, sharing=4, enforce=False)
    stream = io.StringIO()
    bar = Progress(50_000, "cifar10/train", stream=stream, log_every=0, note=check.note)
    bar.update(0)
    check.shard_done(1000, 61_000_000)
    bar.update(1000)
    lines = stream.getvalue().splitlines()
    assert "|" not in lines[0]  # nothing written yet: no projection
    assert lines[1].endswith("| 61.0 MB written, ~3.0 GB at the end")  # this rank's share: 61 kB x 50,000
