"""Materialization to object storage under stress: a store that refuses (no bucket, access denied, failing
server), two configurations racing for one prefix, temporary keys, multipart uploads, probe keys and staging
folders left by killed runs, kill -9 mid-run. moto's S3 server on 127.0.0.1, a fault-injecting proxy in front
of it where a fault is needed.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse

import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main as cli
from rankshard.preprocess.sources.cifar import write_cifar10_archive
from rankshard.preprocess.sources.synth import labelled_images

from remote_servers import fault_proxy, s3_bucket

pytest.importorskip("s3fs")
pytest.importorskip("moto")

OPTIONS = ["--split", "test", "--ranks", "3", "--shard-size", "4", "--batch-size", "4", "--workers", "0",
           "--backend", "torch", "--no-verify-md5", "--quiet"]
BUCKET = "faults"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    return write_cifar10_archive(folder / "cifar-10-python.tar.gz", labelled_images(1), labelled_images(2, seed=1))


@pytest.fixture(scope="module")
def s3():
    with s3_bucket(BUCKET) as (fs, endpoint):
        yield fs, endpoint


@pytest.fixture
def via_proxy(s3, monkeypatch):
    """``via_proxy(rule)``: fsspec talks to moto through a fault proxy for the rest of the test."""
    import fsspec.config
    import s3fs
    stack = []

    def start(rule):
        proxy = fault_proxy(s3[1], rule)
        url, handler = proxy.__enter__()
        stack.append(proxy)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": url,
                                                       "config_kwargs": {"retries": {"max_attempts": 2}}})
        s3fs.S3FileSystem.clear_instance_cache()
        return handler
    yield start
    for proxy in stack:
        proxy.__exit__(None, None, None)
    s3fs.S3FileSystem.clear_instance_cache()


def _run(archive, url, *extra):
    return CliRunner().invoke(cli, ["cifar10", "--source", str(archive), "--out", url, *OPTIONS, *extra])


def _objects(fs, url: str) -> dict[str, bytes]:
    root = url[len("s3://"):]
    fs.invalidate_cache()
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def _keys(fs, url: str) -> list[str]:
    """Listed only: a running process deletes its temporary keys between a listing and a read."""
    fs.invalidate_cache()
    return fs.find(url[len("s3://"):])


def _shard_digests(fs, url: str) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in _objects(fs, url).items()
            if k.endswith((".tar", ".tar.json"))}


def _start_upload(fs, path: str) -> None:
    """An incomplete multipart upload of ``bucket/key``, one part sent: what a kill -9 mid-upload leaves."""
    bucket, key = path.split("/", 1)
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key=key)["UploadId"]
    fs.call_s3("upload_part", Bucket=bucket, Key=key, UploadId=upload, PartNumber=1, Body=b"half a shard")


def _uploads(fs) -> set[str]:
    """``bucket/key`` of every incomplete multipart upload in the bucket."""
    return {f"{BUCKET}/{u['Key']}" for u in fs.call_s3("list_multipart_uploads", Bucket=BUCKET).get("Uploads", [])}


def _store_materializer(archive, url: str, staging, ranks=(3,), **kwargs):
    """A ``StoreMaterializer`` of the test split, driven step by step (``kwargs``: rank, world)."""
    from rankshard.preprocess.objectstore import StoreMaterializer
    from rankshard.preprocess.pipeline import ArraySource
    from rankshard.preprocess.sources.cifar import load_cifar10
    from rankshard.preprocess.spec import ShardSpec

    data = load_cifar10(archive, "test", verify_md5=False)
    source = ArraySource(data.images, data.labels, data.source_ids, data.classes,
                         {"kind": data.kind, "path": str(archive), "fingerprint": data.fingerprint,
                          "checksum_verified": data.checksum_verified})
    spec = ShardSpec(dataset="cifar10", split="test", ranks=ranks, shard_size=4, batch_size=4, workers=0,
                     backend="torch", device="cpu")
    return StoreMaterializer(source, spec, staging, show_progress=False, remote=url, **kwargs)


def test_a_missing_bucket_is_named_with_the_fix_before_any_shard(archive, s3):
    result = _run(archive, "s3://no-such-bucket/out")
    assert result.exit_code == 2, result.output
    assert "s3://no-such-bucket/out: the bucket 'no-such-bucket' does not exist" in result.output
    assert "aws s3 mb" in result.output and "Traceback" not in result.output


def test_a_bucket_or_prefix_named_with_bucket_is_written_and_a_missing_one_named(archive, s3):
    """s3fs's FileNotFoundError for an absent key is the key's path: "bucket" in it made every absent key under
    s3://my-bucket/... read as a missing bucket, so nothing could be written there."""
    s3[0].mkdir("my-bucket")
    result = _run(archive, "s3://my-bucket/bucket-list/out")
    assert result.exit_code == 0, result.output
    result = _run(archive, "s3://absent/out")
    assert result.exit_code == 2 and "the bucket 'absent' does not exist" in result.output, result.output


def test_a_store_answering_412_without_awss_condition_element_is_refused_not_retried(archive, s3, via_proxy):
    """MinIO/Ceph answer a failed If-None-Match with a 412 that s3fs passes on as OSError (it says
    FileExistsError only for AWS's body): the config write lost a race, and the run must say so at once."""
    from rankshard.preprocess.format.transport import transport_for
    url = f"s3://{BUCKET}/cond/.rankshard-config.json"
    handler = via_proxy(lambda method, path: "412" if method == "PUT" and "/cond/" in path else None)
    assert transport_for(url).put_new(b"{}", url) is False
    assert [m for m, p, f in handler.log if f == "412"] == ["PUT"]  # one answer, not four retries


def test_a_resume_does_not_write_the_configuration_again(archive, s3, via_proxy):
    url = f"s3://{BUCKET}/resumed"
    assert _run(archive, url).exit_code == 0
    handler = via_proxy(lambda method, path: None)
    assert _run(archive, url).exit_code == 0
    assert not [p for m, p, _ in handler.log if m == "PUT" and ".rankshard-config.json" in p]


def test_a_configuration_mismatch_names_the_prefix_not_the_staging_folder(archive, s3):
    url = f"s3://{BUCKET}/mismatch"
    assert _run(archive, url).exit_code == 0
    result = _run(archive, url, "--ranks", "5")
    assert result.exit_code == 2 and f"{url}/cifar10/test already holds shards" in result.output, result.output
    assert "--overwrite" not in result.output and "delete that prefix" in result.output


def test_a_read_only_prefix_is_refused_before_any_shard(archive, s3, via_proxy):
    handler = via_proxy(lambda method, path: "403" if method in ("PUT", "POST", "DELETE") else None)
    result = _run(archive, f"s3://{BUCKET}/readonly")
    assert result.exit_code == 2, result.output
    assert f"s3://{BUCKET}/readonly: access denied while writing" in result.output
    assert not [p for m, p, _ in handler.log if m == "PUT" and ".tar" in p]  # refused before any shard


def test_a_server_that_keeps_failing_is_named_after_the_retries(archive, s3, via_proxy, monkeypatch):
    from rankshard.preprocess.format import transport
    monkeypatch.setattr(transport, "RETRY", transport.Retry(attempts=2, backoff_s=0.01, timeout_s=5))
    via_proxy(lambda method, path: "500" if method == "PUT" and "/failing/" in path else None)
    result = _run(archive, f"s3://{BUCKET}/failing")
    assert result.exit_code == 2, result.output
    assert "failed 2 times" in result.output and "Traceback" not in result.output


@pytest.mark.slow  # ~2 min: every one of ~700 requests fails twice, each failure with the client's backoff
def test_dropped_connections_and_5xx_are_retried_to_the_same_bytes(archive, s3, via_proxy):
    fs = s3[0]
    assert _run(archive, f"s3://{BUCKET}/clean").exit_code == 0
    seen: dict = {}

    def flaky(method, path):  # every request fails its first two times, then succeeds
        key = (method, path.split("?")[0] if method != "GET" else path)
        seen[key] = seen.get(key, 0) + 1
        return {1: "drop", 2: "503"}.get(seen[key]) if "/flaky" in path else None
    via_proxy(flaky)
    result = _run(archive, f"s3://{BUCKET}/flaky")
    assert result.exit_code == 0, result.output
    assert _shard_digests(fs, f"s3://{BUCKET}/flaky") == _shard_digests(fs, f"s3://{BUCKET}/clean")
    assert not [k for k in _objects(fs, f"s3://{BUCKET}/flaky") if k.endswith(".partial")]


def test_two_configurations_racing_for_an_empty_prefix_one_is_refused(archive, s3):
    """Both look before either writes: the loser of the config write must be refused, not overwrite it."""
    from rankshard.preprocess.errors import ConfigMismatchError
    from rankshard.preprocess.objectstore import staging_folder

    url = f"s3://{BUCKET}/race"
    with staging_folder(0) as a_dir, staging_folder(0) as b_dir:
        runs = [_store_materializer(archive, url, folder, ranks) for ranks, folder in (((3,), a_dir), ((5,), b_dir))]
        setups = [run._engine_and_config() for run in runs]  # neither finds a config
        runs[0]._prepare_dirs(*setups[0])
        with pytest.raises(ConfigMismatchError, match=r"ranks: \[3\] -> \[5\]"):
            runs[1]._prepare_dirs(*setups[1])
    recorded = json.loads(s3[0].cat_file(f"{BUCKET}/race/cifar10/test/.rankshard-config.json"))
    assert recorded["config"]["ranks"] == [3]


def test_a_rerun_sweeps_the_temporary_keys_a_killed_run_left(archive, s3):
    fs = s3[0]
    url = f"s3://{BUCKET}/swept"
    assert _run(archive, url).exit_code == 0
    folder = f"{BUCKET}/swept/cifar10/test/rank-003"
    left = [f"{folder}/.test-000001.tar.123-deadbeef.partial", f"{folder}/.progress/.test-000002.tar.json.1-ab.partial",
            f"{folder}/.manifest.json.9-cd.partial"]
    for key in left:
        fs.pipe_file(key, b"half an upload")
    fs.rm(f"{folder}/manifest.json")  # as if killed while publishing the manifests
    assert _run(archive, url).exit_code == 0
    assert not [k for k in _objects(fs, url) if k.endswith(".partial")]


def test_a_rerun_aborts_the_multipart_uploads_a_killed_run_left_and_no_others(archive, s3):
    """s3fs uploads a large shard in parts: a kill mid-upload leaves an incomplete multipart upload of its
    temporary key, invisible in listings and billed until aborted."""
    fs = s3[0]
    url = f"s3://{BUCKET}/mpu"
    assert _run(archive, url).exit_code == 0
    folder = f"{BUCKET}/mpu/cifar10/test/rank-003"
    ours = [f"{folder}/.test-000001.tar.123-deadbeef.partial",  # a shard's: swept at the start
            f"{folder}/.manifest.json.9-cd.partial"]  # no shard's: swept by the finishing rank
    others = [f"{folder}/test-000001.tar",  # not a temporary key: someone else's upload
              f"{folder}/sub/.test-000001.tar.1-ab.partial",  # not where rankshard uploads
              f"{BUCKET}/elsewhere/cifar10/test/rank-003/.test-000001.tar.123-deadbeef.partial"]  # another prefix
    for key in ours + others:
        _start_upload(fs, key)
    assert _run(archive, url).exit_code == 0
    assert _uploads(fs) & {*ours, *others} == set(others)


def test_the_start_sweep_leaves_the_uploads_of_other_ranks_shards(archive, s3):
    """A rank starting must not abort an upload that another rank of the job, already running, may be doing."""
    from rankshard.preprocess.objectstore import staging_folder
    fs = s3[0]
    folder = f"{BUCKET}/ranks/cifar10/test/rank-003"
    mine, theirs = f"{folder}/.test-000002.tar.1-ab.partial", f"{folder}/.test-000001.tar.2-cd.partial"
    for key in (mine, theirs):
        _start_upload(fs, key)
    with staging_folder(0) as staging:
        run = _store_materializer(archive, f"s3://{BUCKET}/ranks", staging, rank=0, world=2)  # shards 0, 2, ...
        run._prepare_dirs(*run._engine_and_config())
    assert _uploads(fs) & {mine, theirs} == {theirs}


def test_an_upload_aborted_mid_way_by_another_runs_sweep_is_made_again(s3, via_proxy, tmp_path, monkeypatch):
    """A finishing rank sweeps every temporary upload: one still in flight in another run of the same
    configuration loses its parts (NoSuchUpload) and must start again, not fail that run."""
    import s3fs.core
    from rankshard.preprocess.format.transport import transport_for
    fs, part = s3[0], 5 << 20  # S3's smallest part
    monkeypatch.setattr(s3fs.core, "calculate_chunksize", lambda size, chunksize=None: part)  # multipart from 10 MiB
    local = tmp_path / "big.tar"
    local.write_bytes(os.urandom(2 * part + 1000))
    aborted = []

    def sweep_first_upload(method, path):  # the sweep lands between two parts of the first upload
        if method == "PUT" and "partNumber=2" in path and not aborted:
            key, query = urllib.parse.unquote(path.split("?")[0])[len(f"/{BUCKET}/"):], path.split("?")[1]
            upload = urllib.parse.parse_qs(query)["uploadId"][0]
            fs.call_s3("abort_multipart_upload", Bucket=BUCKET, Key=key, UploadId=upload)
            aborted.append(key)
    via_proxy(sweep_first_upload)
    url = f"s3://{BUCKET}/aborted/big.tar"
    transport_for(url).put_file(local, url)
    assert aborted and aborted[0].endswith(".partial")
    assert fs.cat_file(url[len("s3://"):]) == local.read_bytes()
    assert _keys(fs, f"s3://{BUCKET}/aborted") == [url[len("s3://"):]]  # no temporary key left
    assert not [u for u in _uploads(fs) if "/aborted/" in u]


def test_uploads_are_listed_page_by_page_and_only_those_picked_aborted(monkeypatch):
    """moto answers in one page; S3 pages 1,000 uploads at a time."""
    from rankshard.preprocess.format.transport import S3Transport
    first, second = ({"Key": "p/x/.a.1-a.partial", "UploadId": "1"},
                     [{"Key": "p/x/.b.2-b.partial", "UploadId": "2"}, {"Key": "p/x/b", "UploadId": "3"}])
    pages = {None: {"Uploads": [first], "IsTruncated": True, "NextKeyMarker": first["Key"], "NextUploadIdMarker": "1"},
             first["Key"]: {"Uploads": second, "IsTruncated": False}}
    calls = []

    class Client:  # s3fs's filesystem, as far as the sweep uses it
        @staticmethod
        def split_path(path):
            return (*path.split("/", 1), None)

        @staticmethod
        def call_s3(method, **kwargs):
            calls.append((method, kwargs))
            return pages[kwargs.get("KeyMarker")] if method == "list_multipart_uploads" else {}
    transport = S3Transport("s3")
    monkeypatch.setattr(transport, "_fs", lambda url: (Client(), url[len("s3://"):]))
    transport.sweep_uploads("s3://b/p/x", lambda name: name.endswith(".partial"))
    assert [(k["Key"], k["UploadId"]) for m, k in calls if m == "abort_multipart_upload"] == \
        [("p/x/.a.1-a.partial", "1"), ("p/x/.b.2-b.partial", "2")]
    assert [(k["Prefix"], k.get("UploadIdMarker")) for m, k in calls if m == "list_multipart_uploads"] == \
        [("p/x/", None), ("p/x/", "1")]


def test_a_store_refusing_to_list_uploads_warns_once_and_the_run_completes(archive, s3, via_proxy):
    """ListMultipartUploads is a permission of its own (s3:ListBucketMultipartUploads), often not granted."""
    fs = s3[0]
    listed, refused = f"s3://{BUCKET}/listed", f"s3://{BUCKET}/refused"
    assert _run(archive, listed).exit_code == 0
    handler = via_proxy(lambda method, path: "403" if method == "GET" and "?uploads" in path else None)
    with pytest.warns(UserWarning, match="s3:ListBucketMultipartUploads") as caught:
        result = _run(archive, refused)
    assert result.exit_code == 0, result.output
    assert [f for _, _, f in handler.log if f] == ["403"]  # refused once: not asked again for each folder
    (message,) = [str(w.message) for w in caught if w.category.__name__ == "StoreWarning"]
    assert message.startswith(f"{refused}/cifar10/test: incomplete multipart uploads") and "AccessDenied" in message
    assert "s3:ListBucketMultipartUploads" in message
    assert "s3:AbortMultipartUpload" in message and "AbortIncompleteMultipartUpload" in message
    assert set(_objects(fs, refused)) == set(_objects(fs, listed))
    assert _shard_digests(fs, refused) == _shard_digests(fs, listed)


def test_a_probe_key_a_killed_run_left_is_removed_by_the_next_run(archive, s3):
    from rankshard.preprocess.format.transport import transport_for
    fs = s3[0]
    stale = f"{BUCKET}/probed/.rankshard-probe.123-deadbeef"  # killed between the probe's write and its delete
    fs.pipe_file(stale, b"")
    assert _run(archive, f"s3://{BUCKET}/probed").exit_code == 0
    assert not [k for k in _keys(fs, f"s3://{BUCKET}/probed") if ".rankshard-probe." in k]
    transport_for(f"s3://{stale}").delete(f"s3://{stale}")  # a rank whose probe another rank's sweep took: no error


def test_staging_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    import tempfile
    from rankshard.preprocess import objectstore
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here = objectstore._staging_prefix()  # rankshard-stage-<host>-
    dead, alive, foreign = tmp_path / f"{here}0-dead", tmp_path / f"{here}1-alive", tmp_path / f"{here}0-nolock"
    other_host = tmp_path / "rankshard-stage-elsewhere-0-dead"  # another node's run on a shared TMPDIR
    for folder in (dead, alive, foreign, other_host):
        (folder / "cifar10").mkdir(parents=True)
    old = time.time() - 3600
    for folder in (dead, alive, other_host):
        (folder / objectstore.STAGING_LOCK).touch()
        os.utime(folder / objectstore.STAGING_LOCK, (old, old))
    held = os.open(alive / objectstore.STAGING_LOCK, os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # a run in progress (in another process, its lock is its own)
    try:
        pid = os.fork()
        if pid == 0:  # the sweep must run in another process: flock is per open file, not per process
            code = 1
            with objectstore.staging_folder(0) as mine:
                code = 0 if mine.is_dir() and mine.name.startswith(f"{here}0-") else 1
                (tmp_path / "mine").write_text(mine.name)
            os._exit(code)
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(held)
    assert not dead.exists() and alive.is_dir() and foreign.is_dir() and other_host.is_dir()
    assert not (tmp_path / (tmp_path / "mine").read_text()).exists()  # the run's own folder went with it


def test_a_full_staging_disk_names_tmpdir(archive, s3, monkeypatch):
    from rankshard.preprocess.format import tar

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(tar.os, "fsync", full)
    result = _run(archive, f"s3://{BUCKET}/full")
    assert result.exit_code == 2 and "the disk is full" in result.output
    assert "set TMPDIR to a folder on a disk with room" in result.output


@pytest.mark.slow
def test_kill_9_mid_run_then_rerun_gives_the_same_objects(archive, s3, tmp_path):
    fs = s3[0]
    clean, killed = f"s3://{BUCKET}/k9-clean", f"s3://{BUCKET}/k9-killed"
    assert _run(archive, clean).exit_code == 0
    command = [sys.executable, "-m", "rankshard.preprocess", "cifar10", "--source", str(archive), "--out", killed,
               *OPTIONS]
    mid_run = []
    for delay in (0.5, 1.5, 3.0):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None and \
                not [k for k in _keys(fs, killed) if k.endswith(".tar.json")]:
            time.sleep(0.05)
        time.sleep(delay)
        mid_run.append(proc.poll() is None and not [k for k in _keys(fs, killed) if k.endswith("manifest.json")])
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(mid_run), "no kill landed while the run was still writing shards"
    listed = CliRunner().invoke(cli, ["ls", killed])
    complete = "manifest.json" in "".join(_objects(fs, killed))
    assert ("complete" if complete else "stopped") in listed.output
    assert _run(archive, killed).exit_code == 0
    assert _shard_digests(fs, killed) == _shard_digests(fs, clean)
    assert not [k for k in _objects(fs, killed) if k.endswith(".partial") or "probe" in k]
    assert "complete" in CliRunner().invoke(cli, ["ls", killed]).output
