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


@pytest.mark.parametrize("forbid", ["hidden", "missing"])
def test_servers_answering_403_for_dotfiles_or_absent_files_still_serve_a_variant(forbid):
    """nginx commonly denies dotfiles, and a bucket without list rights answers 403 for an absent key: both made
    the optional probe of the split's .rankshard-config.json fatal, so verify of a variant URL failed."""
    from rankshard.preprocess.verify import verify_tree

    local_ls = _without_lock(_ls(built_root().joinpath(*TRAIN)))
    with http_server(built_root(), forbid=forbid) as (url, _):
        variant = f"{url}/cifar10/train/rank-005"
        report = verify_tree(variant, reference_samples=1)
        assert report.ok and [c.folder for c in report.checks] == [variant]
        listed = _without_lock(_ls(variant))
        if forbid == "missing":  # the config is served: the split URL works too, and so does the same listing
            assert listed == local_ls and _without_lock(_ls(f"{url}/cifar10/train")) == local_ls
    if forbid == "hidden":  # the configuration is hidden: the variants' manifests carry the same entries
        assert [(s["status"], s["config_hash"], s["shards_done"]) for s in listed] == \
            [(s["status"], s["config_hash"], s["shards_done"]) for s in local_ls]


def test_an_unfinished_variant_folder_names_its_split_locally_and_over_http(tmp_path):
    root = _unfinished_copy(tmp_path / "copy")
    variant = root.joinpath(*TRAIN, "rank-005")
    assert _ls(variant) == _ls(root.joinpath(*TRAIN))  # it said "no rankshard splits below it"
    with http_server(root) as (url, _):
        (train,) = _ls(f"{url}/cifar10/train/rank-005")
    assert train["status"] == "stopped" and train["path"] == "train"


def test_another_tools_manifest_at_root_is_not_taken_for_a_variant(tmp_path):
    """ls of a folder holding someone else's manifest.json listed the splits of its parent folder."""
    shutil.copytree(built_root(), tmp_path / "data")
    foreign = tmp_path / "data" / "coco"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"name": "other-tool", "files": []}')
    assert _ls(foreign) == []
    assert [s["path"] for s in _ls(tmp_path / "data")] == ["cifar10/test", "cifar10/train"]


@pytest.mark.parametrize("config", ['{"config": {"ranks": [1]}}', '{"config": {"ranks": "abc", "high": []}}',
                                   '{"config": {"ranks": %s, "high": [], "encoding": "png"}}' % list(range(1, 2000))])
def test_a_malformed_remote_configuration_is_refused_with_the_file_named(tmp_path, config):
    split = tmp_path.joinpath(*TRAIN)
    split.mkdir(parents=True)
    (split / ".rankshard-config.json").write_text(config)
    with http_server(tmp_path) as (url, _):
        for command in ("ls", "verify", "preview"):
            result = CliRunner().invoke(main, [command, f"{url}/cifar10/train"])
            # ls lists a split it cannot read as unreadable, with the reason; the others stop there (exit 2)
            assert result.exit_code == (0 if command == "ls" else 2), (command, result.output)
            assert "Traceback" not in result.output and "cifar10/train" in result.output
            assert "readable rankshard config" in result.output or "variants (more than 1,000" in result.output
            assert command != "ls" or "train  unreadable: RankshardError: " in result.output


def test_a_symlinked_variant_is_listed_and_a_link_loop_ends(tmp_path):
    root = tmp_path / "data"
    shutil.copytree(built_root(), root)
    elsewhere = tmp_path / "elsewhere"
    (root.joinpath(*TRAIN, "rank-005")).rename(elsewhere)
    root.joinpath(*TRAIN, "rank-005").symlink_to(elsewhere)  # a variant kept on another disk
    (root / "cifar10" / "loop").symlink_to(root)  # and a link back up the tree
    (root / "a-alias").symlink_to(root / "cifar10")  # an alias sorting before the folder it names
    assert _without_lock(_ls(root)) == _without_lock(_ls(built_root()))


def test_the_walk_lists_shards_tree_files_only():
    """A raw dataset beside the shards (a million JPEGs) is not stat'ed file by file."""
    from rankshard.preprocess.format.tree import files_below

    files = files_below(built_root())
    assert files and all(f.endswith((".tar", ".json", ".partial")) for f in files)
    assert any(f.endswith("/.progress/train-000000.tar.json") for f in files)


def test_a_url_refused_for_a_missing_token_says_so():
    """Probes read a 403 as absent (some servers answer so for what is not there); when nothing is found, the
    error must still say the server refused, or an expired token reads as a wrong URL."""
    with http_server(built_root(), token="s3cret") as (url, _):
        result = CliRunner().invoke(main, ["ls", f"{url}/cifar10/train"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the server refused" in result.output and "(HTTP 401/403)" in result.output and "token" in result.output
