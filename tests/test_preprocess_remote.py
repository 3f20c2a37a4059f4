"""``rankshard-preprocess cifar10 --out s3://...`` against a local S3 server (moto, 127.0.0.1).

Two torchrun-style ranks (RANK/WORLD_SIZE, two processes that share no folder) write the same objects,
byte for byte, as one local run; resume skips what is there; the loaders read the result.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main as cli
from rankshard.preprocess.sources.cifar import write_cifar10_archive
from rankshard.preprocess.sources.synth import labelled_images

from remote_servers import s3_bucket

pytest.importorskip("s3fs")
pytest.importorskip("moto")

OPTIONS = ["--ranks", "3", "--shard-size", "16", "--batch-size", "16", "--workers", "0", "--backend", "torch",
           "--no-verify-md5", "--quiet"]
BUCKET = "rankshard-out"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    return write_cifar10_archive(folder / "cifar-10-python.tar.gz", labelled_images(5), labelled_images(2, seed=1))


@pytest.fixture(scope="module")
def s3():
    with s3_bucket(BUCKET) as (fs, _):
        yield fs


def _rank(archive, url: str, rank: int, world: int) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999", "TORCHELASTIC_RUN_ID": "remote-test"}
    command = [sys.executable, "-m", "rankshard.preprocess", "cifar10", "--source", str(archive), "--out", url,
               *OPTIONS]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _objects(fs, url: str) -> dict[str, bytes]:
    root = url[len("s3://"):]
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def test_two_ranks_write_to_s3_what_one_local_run_writes(archive, s3, tmp_path):
    local = tmp_path / "local"
    result = CliRunner().invoke(cli, ["cifar10", "--source", str(archive), "--out", str(local), *OPTIONS])
    assert result.exit_code == 0, result.output
    url = f"s3://{BUCKET}/run"
    ranks = [_rank(archive, url, r, 2) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], outputs
    got = _objects(s3, url)
    want = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
            if p.is_file() and ".lock" not in p.name and not p.name.startswith(".rankshard-config")}
    assert not [k for k in got if k.endswith(".partial")]  # no temporary key survives
    shards = [k for k in want if k.endswith(".tar")]
    assert len(shards) >= 8 and all(got[k] == want[k] for k in shards)  # byte-identical shards
    assert {k for k in got if "/.progress/" in k} == {k for k in want if "/.progress/" in k}
    for k in [k for k in want if k.endswith("manifest.json")]:
        a, b = json.loads(got[k]), json.loads(want[k])
        for m in (a, b):
            m.pop("stats")  # timings of this run
        assert a == b
    for k in [k for k in want if k.endswith(("wids.json", "README.md"))]:
        assert got[k] == want[k]


def test_resume_skips_what_is_there_and_loaders_read_it(archive, s3, tmp_path):
    url = f"s3://{BUCKET}/resume"
    first = CliRunner().invoke(cli, ["cifar10", "--split", "test", "--source", str(archive), "--out", url, *OPTIONS])
    assert first.exit_code == 0, first.output
    assert f"{url}/cifar10/test" in first.output
    s3.rm(f"{BUCKET}/resume/cifar10/test/rank-003/test-000001.tar")  # as if a rank had died before publishing it
    s3.rm(f"{BUCKET}/resume/cifar10/test/rank-003/manifest.json")
    again = CliRunner().invoke(cli, ["cifar10", "--split", "test", "--source", str(archive), "--out", url, *OPTIONS])
    assert again.exit_code == 0, again.output
    assert "1 shards (1 already done)" in again.output
    from rankshard.loaders import LoaderConfig, eval_loader, open_variant
    local = tmp_path / "local"
    CliRunner().invoke(cli, ["cifar10", "--split", "test", "--source", str(archive), "--out", str(local), *OPTIONS])
    cfg = LoaderConfig(workers=0, batch_size=8)
    remote = [(b.keys, b.x) for b in eval_loader(open_variant(url, "cifar10", "test", "rank-003"), cfg, 0, 1)]
    here = [(b.keys, b.x) for b in eval_loader(open_variant(local, "cifar10", "test", "rank-003"), cfg, 0, 1)]
    assert [k for k, _ in remote] == [k for k, _ in here]
    assert all((a == b).all() for (_, a), (_, b) in zip(remote, here))


def test_overwrite_on_object_storage_is_refused_naming_the_fix(archive, s3):
    result = CliRunner().invoke(cli, ["cifar10", "--split", "test", "--source", str(archive), "--out",
                                      f"s3://{BUCKET}/x", "--overwrite", *OPTIONS])
    assert result.exit_code == 2 and "delete the prefix" in result.output
