"""``rankshard-preprocess ls``, ``preview`` (and ``verify``) over object storage (moto's S3) and HTTP report and
draw what they do for the local tree; over HTTP, which cannot list, ROOT names a split or variant folder.

Servers run on 127.0.0.1 (``ranged_http`` and ``s3_root`` in conftest.py serve ``built_root()``).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main

from loaders_shards import built_root
from remote_servers import http_server, upload_folder

TRAIN = ("cifar10", "train")


def _run(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _ls(root) -> list[dict]:
    return json.loads(_run("ls", str(root), "--json"))


def _without_lock(splits: list[dict]) -> list[dict]:
    """The listing minus ``lock_visible``: the one field in which a remote listing differs by design."""
    return [{k: v for k, v in s.items() if k != "lock_visible"} for s in splits]


def _unfinished_copy(dest: Path) -> Path:
    """The shared tree as a run that stopped in cifar10/train: no manifests yet, one shard of rank-005 never
    published, and the temporary key of an upload that was cut off."""
    shutil.copytree(built_root(), dest, ignore=shutil.ignore_patterns(".lock*"))
    split = dest.joinpath(*TRAIN)
    for manifest in split.glob("*/manifest.json"):
        manifest.unlink()
    (split / "rank-005" / "train-000003.tar").unlink()
    (split / "rank-005" / ".progress" / "train-000003.tar.json").unlink()
    (split / "rank-005" / ".train-000003.tar.4242-0a1b2c3d.partial").write_bytes(b"half a shard")
    return dest


def test_ls_over_s3_lists_what_ls_of_the_local_tree_lists(s3_root):
    local, remote = _ls(built_root()), _ls(s3_root)
    assert [s["path"] for s in remote] == ["cifar10/test", "cifar10/train"]
    assert _without_lock(remote) == _without_lock(local)
    assert [s["lock_visible"] for s in local + remote] == [True, True, False, False]
    text = _run("ls", s3_root).splitlines()
    assert text[0] == s3_root and text[1:] == _run("ls", str(built_root())).splitlines()[1:]
    # a variant folder lists the split above it, as locally
    assert _ls(f"{s3_root}/cifar10/train/rank-005") == _ls(f"{s3_root}/cifar10/train")
    assert _without_lock(_ls(f"{s3_root}/cifar10/train")) == _without_lock(_ls(built_root().joinpath(*TRAIN)))


def test_an_unfinished_run_on_s3_is_stopped_with_no_claim_about_a_writer(s3_root, tmp_path):
    local = _unfinished_copy(tmp_path / "copy")
    url = "s3://rankshard-test/unfinished"
    upload_folder(local, url)
    listed = {s["path"]: s for s in _ls(url)}
    train = listed["cifar10/train"]
    assert (train["status"], train["shards_done"], train["shards_planned"]) == ("stopped", 6, 7)
    assert (train["writer"], train["lock_visible"], train["partial_files"]) == (None, False, 1)
    assert listed["cifar10/test"]["status"] == "complete"
    assert _without_lock(list(listed.values())) == _without_lock(_ls(local))
    text = _run("ls", url)
    assert ("train  stopped: 6 of 7 shards done; rerun the same command to resume (s3:// keeps no run lock: a "
            "run elsewhere may still be writing it; 1 unfinished upload there, in flight or cut off)") in text
    assert "keeps no run lock" not in _run("ls", str(local))  # a local folder has its lock: no such caveat


def test_http_ls_takes_a_split_or_variant_folder_and_refuses_the_root(ranged_http):
    url, _ = ranged_http
    result = CliRunner().invoke(main, ["ls", url])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "http:// cannot list a folder" in result.output and "name a variant folder" in result.output
    local = _without_lock(_ls(built_root().joinpath(*TRAIN)))
    for named in (f"{url}/cifar10/train", f"{url}/cifar10/train/rank-005", f"{url}/cifar10/train/"):
        assert _without_lock(_ls(named)) == local, named


def test_http_ls_of_an_unfinished_split_says_what_cannot_be_counted(tmp_path):
    split = tmp_path.joinpath(*TRAIN)
    shutil.copytree(built_root().joinpath(*TRAIN), split)
    (split / "rank-005" / "manifest.json").unlink()
    with http_server(tmp_path) as (url, _):
        (train,) = _ls(f"{url}/cifar10/train/full")
        text = _run("ls", f"{url}/cifar10/train")
    assert (train["status"], train["shards_done"], train["bytes"], train["images"]) == ("stopped", None, None, 230)
    assert train["variants"]["rank-005"] == {"shards": None, "bytes": None, "manifest": False}
    assert train["variants"]["full"]["manifest"] and train["variants"]["full"]["shards"] == 7
    assert "stopped: 4 of 5 variants complete; http:// cannot list, so the shards done cannot be counted" in text


def test_verify_over_http_takes_a_split_folder(ranged_http):
    from rankshard.preprocess.verify import verify_tree

    url, _ = ranged_http
    remote = verify_tree(f"{url}/cifar10/train", reference_samples=2)
    local = verify_tree(built_root().joinpath(*TRAIN), reference_samples=2)
    assert remote.ok and [(c.folder.rsplit("/", 1)[1], c.samples, c.max_error) for c in remote.checks] == \
        [(c.folder.rsplit("/", 1)[1], c.samples, c.max_error) for c in local.checks]


def _preview(root, out: Path, *extra: str) -> dict[str, bytes]:
    """Run preview; every file it says it wrote, by name, with its bytes."""
    lines = _run("preview", str(root), "--count", "2", "--quiet", *extra, *(["--out", str(out)] if out else []))
    written = [Path(line.removeprefix("wrote ")) for line in lines.splitlines()]
    return {p.name: p.read_bytes() for p in written}


@pytest.fixture(scope="module")
def local_previews(tmp_path_factory):
    """The local previews of the whole tree and of cifar10/train alone (each run once)."""
    out = tmp_path_factory.mktemp("local")
    return {"tree": _preview(built_root(), out / "tree" / "p.png"),
            "train": _preview(built_root().joinpath(*TRAIN), out / "train" / "p.png")}


def test_preview_over_s3_draws_the_local_images(s3_root, local_previews, tmp_path):
    got = _preview(s3_root, tmp_path / "p.png")
    assert set(got) == {f"p-cifar10-{s}{tail}.png" for s in ("train", "test") for tail in ("", "-energy")} - {
        "p-cifar10-test-energy.png"}  # the test split was made without spectra
    assert got == local_previews["tree"]


def test_preview_over_http_draws_the_local_images(ranged_http, local_previews, tmp_path):
    url, _ = ranged_http
    assert _preview(f"{url}/cifar10/train", tmp_path / "p.png") == local_previews["train"]
    assert _preview(f"{url}/cifar10/train/high-002", tmp_path / "v" / "p.png") == local_previews["train"]


def test_preview_of_a_url_writes_into_the_current_folder_by_default(ranged_http, local_previews, tmp_path,
                                                                   monkeypatch):
    url, _ = ranged_http
    monkeypatch.chdir(tmp_path)
    got = _preview(f"{url}/cifar10/train", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview-energy.png", "preview.png"]
    assert list(got.values()) == list(local_previews["train"].values())
