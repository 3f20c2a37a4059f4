"""`rankshard-preprocess ls`: complete splits, a stopped run (how far it got), a run writing now."""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
from click.testing import CliRunner

from rankshard.preprocess import diskspace
from rankshard.preprocess.cli import main
from rankshard.preprocess.diskspace import OutOfSpaceError
from rankshard.preprocess.locking import RunLock, group_id
from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.spec import ShardSpec

N, SHARD = 60, 20


def _source() -> ArraySource:
    images, labels = labelled_images(N // 10, seed=8)
    info = {"kind": "test", "path": "memory", "fingerprint": "inventory", "checksum_verified": False}
    return ArraySource(images, labels, [f"mem:{i}" for i in range(N)], tuple("abcdefghij"), info)


def _spec(split="train") -> ShardSpec:
    return ShardSpec("cifar10", split, ranks=(3,), factors=4, shard_size=SHARD, batch_size=SHARD, workers=0,
                     backend="gram64")


def _ls(root) -> list[dict]:
    result = CliRunner().invoke(main, ["ls", str(root), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_complete_split_is_listed_with_its_manifests_figures(tmp_path):
    result = materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    (split,) = _ls(tmp_path)
    assert (split["path"], split["status"], split["images"]) == ("cifar10/train", "complete", N)
    assert split["shards_done"] == split["shards_planned"] == N // SHARD
    assert set(split["variants"]) == set(result["manifests"]) == {"full", "rank-003", "factors-004", "spectra"}
    for name, m in result["manifests"].items():
        assert split["variants"][name] == {"shards": 3, "bytes": sum(s["bytes"] for s in m["shards"]),
                                           "manifest": True}
    assert split["bytes"] == sum(p.stat().st_size for p in tmp_path.rglob("*.tar"))
    assert split["config"]["ranks"] == [3] and split["backend"] == "gram64" and split["writer"] is None


def test_a_stopped_run_says_how_far_it_got_and_how_to_resume(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: usage(2, 1, 1))
    with pytest.raises(OutOfSpaceError):
        materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    (split,) = _ls(tmp_path)
    assert (split["status"], split["shards_done"], split["shards_planned"], split["images"]) == ("stopped", 1, 3, N)
    assert all(not v["manifest"] for v in split["variants"].values())
    text = CliRunner().invoke(main, ["ls", str(tmp_path)]).output
    assert "stopped: 1 of 3 shards done; rerun the same command to resume" in text


def test_a_run_holding_the_lock_is_reported_as_writing(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: usage(2, 1, 1))
    with pytest.raises(OutOfSpaceError):
        materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    with RunLock(tmp_path / "cifar10" / "train"):  # what a live run holds
        (split,) = _ls(tmp_path)
        assert split["status"] == "writing" and split["writer"] == group_id(0, 1)
    assert _ls(tmp_path)[0]["status"] == "stopped"  # released: the probe itself holds nothing


def test_several_splits_and_an_empty_root(tmp_path):
    for split in ("train", "test"):
        materialize_split(_source(), _spec(split), tmp_path / "a", show_progress=False)
    assert [s["path"] for s in _ls(tmp_path)] == ["a/cifar10/test", "a/cifar10/train"]
    (tmp_path / "empty").mkdir()
    out = CliRunner().invoke(main, ["ls", str(tmp_path / "empty")])
    assert out.exit_code == 0 and "no rankshard splits below it" in out.output


def test_a_damaged_split_is_listed_as_unreadable_and_the_others_still_are(tmp_path):
    for split in ("train", "test"):
        materialize_split(_source(), _spec(split), tmp_path, show_progress=False)
    (tmp_path / "cifar10" / "test" / ".rankshard-config.json").write_text('{"config": {}}')
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"files": []}')  # another tool's: not a split
    listed = {s["path"]: s for s in _ls(tmp_path)}
    assert set(listed) == {"cifar10/test", "cifar10/train"}
    assert listed["cifar10/test"]["status"] == "unreadable" and "config_hash" in listed["cifar10/test"]["problem"]
    assert listed["cifar10/train"]["status"] == "complete"
    text = CliRunner().invoke(main, ["ls", str(tmp_path)])
    assert text.exit_code == 0 and "cifar10/test  unreadable: KeyError" in text.output


def test_a_copy_without_hidden_files_is_found_by_its_manifests(tmp_path):
    import shutil

    materialize_split(_source(), _spec(), tmp_path / "made", show_progress=False)
    shutil.copytree(tmp_path / "made", tmp_path / "copy", ignore=shutil.ignore_patterns(".*"))  # rsync w/o dotfiles
    (split,) = _ls(tmp_path / "copy")
    assert (split["status"], split["shards_done"], split["images"]) == ("complete", 3, N)
    assert split["config_hash"] == _ls(tmp_path / "made")[0]["config_hash"]
    (alone,) = _ls(tmp_path / "copy" / "cifar10" / "train")  # ROOT is the split itself
    assert alone["path"] == "train"


def test_a_held_gate_does_not_hang_the_listing(tmp_path, monkeypatch):
    import fcntl
    import os

    from rankshard.preprocess import locking

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(diskspace.shutil, "disk_usage", lambda path: usage(2, 1, 1))
    with pytest.raises(OutOfSpaceError):
        materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    gate = os.open(tmp_path / "cifar10" / "train" / ".lock.gate", os.O_RDWR)
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)  # a run calibrating, finalizing, or stopped with Ctrl-Z
        (split,) = _ls(tmp_path)
    finally:
        os.close(gate)
    assert split["status"] == "writing" and split["writer"] == locking.GATE_BUSY


def test_a_variant_folder_lists_the_split_above_it(tmp_path):
    """As over HTTP, where a variant folder is one of the two things ROOT may name (it was a ValueError)."""
    materialize_split(_source(), _spec(), tmp_path, show_progress=False)
    split = tmp_path / "cifar10" / "train"
    assert _ls(split / "rank-003") == _ls(split) and _ls(split)[0]["path"] == "train"
