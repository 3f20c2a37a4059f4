"""Loaders over HTTP (with and without Range support), S3 (moto) and pipe: give exactly the local samples.

Every server runs on 127.0.0.1, started and stopped by a fixture (tests/remote_servers.py; ``ranged_http`` and
``s3_root`` are in conftest.py, shared with the remote ``ls``/``preview`` tests).
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from rankshard.loaders import LoaderConfig, eval_loader, open_variant, train_loader
from rankshard.loaders.errors import LoaderError, ShardReadError
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format import transport

from loaders_shards import built_root
from remote_servers import http_server

TRAIN, EVAL = ("cifar10", "train", "rank-005"), ("cifar10", "test", "rank-003")
CFG = dict(batch_size=16, shuffle_buffer=64, augment="cifar")


def _run(info, kind: str, rank: int, world: int, workers: int, start: int = 0, **extra):
    cfg = LoaderConfig(workers=workers, **{**CFG, **extra})
    loader = (train_loader(info, cfg, epoch=1, rank=rank, world_size=world, start_step=start) if kind == "train"
              else eval_loader(info, cfg, rank=rank, world_size=world))
    return [(b.keys, b.y.tolist(), b.x) for b in loader]


def _same(got, want) -> None:
    assert len(got) == len(want)
    for (k1, y1, x1), (k2, y2, x2) in zip(got, want):
        assert k1 == k2 and y1 == y2
        assert torch.equal(x1, x2)


_LOCAL: dict = {}


def _local(kind: str, rank: int, world: int):
    """The local run, computed once (workers do not change batches, so workers=0 is the reference)."""
    if (kind, rank, world) not in _LOCAL:
        info = open_variant(built_root(), *(TRAIN if kind == "train" else EVAL))
        _LOCAL[kind, rank, world] = _run(info, kind, rank, world, 0)
    return _LOCAL[kind, rank, world]


@pytest.fixture(scope="module")
def plain_http():
    with http_server(built_root(), ranged=False) as (url, handler):
        yield url, handler


def _pipe_root(kind: str) -> str:
    folder = built_root().joinpath(*(TRAIN if kind == "train" else EVAL))
    names = json.loads((folder / "manifest.json").read_text())["shards"]
    return f"pipe:cat {folder}/{names[0]['name'][:-10]}{{000000..{len(names) - 1:06d}}}.tar"


def _open(where: str, request, kind: str):
    parts = TRAIN if kind == "train" else EVAL
    if where == "pipe":
        return open_variant(_pipe_root(kind))
    root = request.getfixturevalue(where)
    return open_variant(root if isinstance(root, str) else root[0], *parts)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("where", ["ranged_http", "plain_http", "s3_root", "pipe"])
def test_remote_loaders_give_the_local_samples(where, workers, request):
    for kind in ("train", "eval"):
        info = _open(where, request, kind)
        assert info.shard_checks and all(sha for sha, _ in info.shard_checks.values())
        for world in (1, 2, 3):
            steps = set()
            for rank in range(world):
                got = _run(info, kind, rank, world, workers)
                _same(got, _local(kind, rank, world))
                steps.add(len(got))
            assert len(steps) == 1  # equal steps on every rank


def test_resume_mid_epoch_over_http(ranged_http):
    info = open_variant(ranged_http[0], *TRAIN)
    full = _local("train", 1, 2)
    _same(_run(info, "train", 1, 2, 2, start=3), full[3:])


def test_cache_serves_the_second_epoch_and_stays_under_its_limit(tmp_path, ranged_http):
    url, handler = ranged_http
    info = open_variant(url, *TRAIN)
    manifest = info.manifest
    shard_bytes = max(s["bytes"] for s in manifest["shards"])
    cache = tmp_path / "cache"
    first = _run(info, "train", 0, 1, 2, cache_dir=str(cache), cache_bytes=3 * shard_bytes)
    _same(first, _local("train", 0, 1))
    kept = sorted(p.name for p in cache.glob("*.tar"))
    assert 0 < len(kept) <= 3 and set(kept) <= {f"{s['sha256']}.tar" for s in manifest["shards"]}
    assert not list(cache.glob("*.partial*"))
    # with every shard cached, the server is no longer needed
    big = tmp_path / "big"
    _run(info, "eval", 0, 1, 0, cache_dir=str(big))
    handler.faults.update({s["name"]: "404" for s in manifest["shards"]})
    try:
        again = _run(info, "eval", 0, 1, 2, cache_dir=str(big))
    finally:
        handler.faults.clear()
    _same(again, _run(open_variant(built_root(), *TRAIN), "eval", 0, 1, 0))


@pytest.mark.parametrize("fixture", ["ranged_http", "plain_http"])
def test_a_dropped_connection_is_retried(fixture, request):
    url, handler = request.getfixturevalue(fixture)
    info = open_variant(url, *EVAL)
    first = info.manifest["shards"][0]["name"]
    handler.log.clear()
    handler.faults[first] = "drop"
    _same(_run(info, "eval", 0, 1, 0), _local("eval", 0, 1))
    ranges = [r for _, path, r in handler.log if path.endswith(first)]
    assert len(ranges) == 2  # the broken GET and its retry
    assert (ranges[1] is not None) == (fixture == "ranged_http")  # resumed where it broke, if the server can


def test_404_and_changed_objects_are_named(ranged_http, tmp_path):
    url, handler = ranged_http
    name = json.loads(built_root().joinpath(*EVAL, "manifest.json").read_text())["shards"][1]["name"]
    handler.faults[name] = "404"
    try:
        with pytest.raises(LoaderError, match=f"{name}: listed in manifest.json but missing"):
            open_variant(url, *EVAL)
    finally:
        handler.faults.clear()
    info = open_variant(url, *EVAL)
    handler.faults[name] = "changed"  # replaced after the variant was opened: caught when fetched
    try:
        with pytest.raises(ShardReadError, match=f"{url}/.*{name}: sha256 .* differs.*rewrite this one"):
            _run(info, "eval", 0, 1, 0, cache_dir=str(tmp_path / "c"))
        cfg = LoaderConfig(workers=0, batch_size=16, on_error="skip", cache_dir=str(tmp_path / "c"))
        loader = eval_loader(info, cfg, 0, 1)
        with pytest.warns(UserWarning, match="skipped"):
            n = sum(len(b) for b in loader)
    finally:
        handler.faults.clear()
    assert loader.skipped == info.shard_sizes[1] and n == info.num_samples - info.shard_sizes[1]
    assert not any(p.name.startswith(info.manifest["shards"][1]["sha256"]) for p in (tmp_path / "c").iterdir())


def test_a_slow_server_times_out_and_the_error_names_the_url(ranged_http, monkeypatch):
    url, handler = ranged_http
    monkeypatch.setattr(transport, "RETRY", transport.Retry(attempts=2, backoff_s=0.01, timeout_s=0.3))
    name = json.loads(built_root().joinpath(*EVAL, "manifest.json").read_text())["shards"][0]["name"]
    handler.faults[name] = "slow"
    try:
        with pytest.raises(transport.TransportError, match=f"{name}: failed 2 times"):
            transport.fetch(f"{url}/cifar10/test/rank-003/{name}")
    finally:
        handler.faults.clear()


def test_a_server_that_fails_mid_epoch_is_named_as_the_way_to_the_shard_not_the_shard(ranged_http, monkeypatch):
    """Retries spent on a timing-out server: the advice is to check the server and network, not to rewrite a
    shard whose bytes never arrived."""
    url, handler = ranged_http
    info = open_variant(url, *EVAL)
    monkeypatch.setattr(transport, "RETRY", transport.Retry(attempts=2, backoff_s=0.01, timeout_s=0.3))
    name = info.manifest["shards"][0]["name"]
    handler.faults[name] = "slow"
    try:
        with pytest.raises(ShardReadError, match=f"{name}.*failed 2 times.*reachable from this machine") as caught:
            _run(info, "eval", 0, 1, 0)
    finally:
        handler.faults.clear()
    assert "rewrite" not in str(caught.value)


def test_a_body_that_never_ends_is_cut_off_not_held_in_memory(ranged_http, monkeypatch):
    """A shard is read up to its manifest size (+ one chunk), a manifest up to TEXT_LIMIT: a server that
    keeps sending is refused by name instead of filling this process's memory."""
    url, handler = ranged_http
    info = open_variant(url, *EVAL)
    name, nbytes = info.manifest["shards"][0]["name"], info.manifest["shards"][0]["bytes"]
    monkeypatch.setattr(transport, "TEXT_LIMIT", 4 << 20)
    handler.faults.update({name: "endless", "manifest.json": "endless"})
    try:
        with pytest.raises(transport.IntegrityError, match=f"more than {nbytes} bytes, the manifest says {nbytes}"):
            transport.fetch(f"{url}/cifar10/test/rank-003/{name}", nbytes=nbytes)
        with pytest.raises(LoaderError, match="more than 4,194,304 bytes"):
            open_variant(url, *EVAL)
    finally:
        handler.faults.clear()


def test_stale_partial_downloads_in_the_cache_are_removed(tmp_path, ranged_http):
    url, _ = ranged_http
    info = open_variant(url, *EVAL)
    cache = transport.ShardCache(tmp_path)
    old, fresh = tmp_path / ".abc.tar.partial.123", tmp_path / ".def.tar.partial.456"
    for p in (old, fresh):
        p.write_bytes(b"x")
    hours_ago = old.stat().st_mtime - 2 * transport.STALE_PARTIAL_S
    os.utime(old, (hours_ago, hours_ago))
    shard = info.manifest["shards"][0]
    cache.open(f"{url}/cifar10/test/rank-003/{shard['name']}", shard["sha256"], shard["bytes"]).close()
    assert not old.exists() and fresh.exists()  # a download being written now is left alone


def test_unknown_scheme_and_missing_manifest_are_refused(ranged_http):
    with pytest.raises(LoaderError, match="no manifest.json"):
        open_variant(ranged_http[0], "cifar10", "train", "nothing-here")


def test_join_variants_checks_remote_shards_against_the_manifest(tmp_path):
    """join_variants reads remote shards through the same checks as the loaders: a shard replaced on the
    server after the variant was opened (same size, a changed image byte) is refused, naming the URL."""
    import shutil
    from rankshard.loaders import join_variants
    from rankshard.preprocess.format.tarindex import scan_shard

    root = tmp_path / "served"
    for variant in ("rank-005", "full"):
        shutil.copytree(built_root() / "cifar10" / "train" / variant, root / "cifar10" / "train" / variant)
    with http_server(root) as (url, _):
        low, full = (open_variant(url, "cifar10", "train", v) for v in ("rank-005", "full"))
        shard = root / "cifar10" / "train" / "rank-005" / low.manifest["shards"][1]["name"]
        offset, size = scan_shard(shard).members[0]["png"]
        data = bytearray(shard.read_bytes())
        data[offset + size // 2] ^= 0x01  # the tar still scans; only the sha256 tells
        shard.write_bytes(bytes(data))
        with pytest.raises(ShardReadError, match=f"{url}/cifar10/train/rank-005/{shard.name}.*sha256 .* differs"):
            list(join_variants(low, full, batch_size=16, rank=0, world_size=1))


def _returns(fn, *args):
    """fn(*args)'s result or exception, run in a thread so that a hang fails the test instead of the session."""
    import threading
    out = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as exc:  # handed to the test
            out["error"] = exc
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)  # a guard against hanging the session, not a timing: the call must return at all
    assert not thread.is_alive(), f"{fn.__name__}{args} never returned"
    return out


def test_a_silent_pipe_command_times_out_and_is_killed(tmp_path, monkeypatch):
    """pipe: honours the transport timeout like a server does; the command and its children are killed."""
    monkeypatch.setattr(transport, "RETRY", transport.Retry(attempts=2, backoff_s=0.01, timeout_s=0.3))
    pids = tmp_path / "pids"
    url = f"pipe:sleep 600 & echo $! >> {pids}; wait"
    out = _returns(transport.fetch, url)
    assert isinstance(out.get("error"), transport.TransportError)
    assert f"{url}: failed 2 times" in str(out["error"]) and "wrote nothing for 0.3 s" in str(out["error"])
    for pid in pids.read_text().split():  # killed with its shell: gone, or a zombie until reaped
        assert _ends(int(pid)), f"pipe child {pid} still running"


def _ends(pid: int) -> bool:
    """Whether process ``pid`` ends (or is a zombie), polled: a SIGKILL is delivered asynchronously."""
    import time
    stat = f"/proc/{pid}/stat"
    for _ in range(600):  # up to a minute: a guard, the kill has been sent already
        try:
            state = open(stat).read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.1)
    return False


def test_a_pipe_command_that_writes_much_to_stderr_does_not_block():
    """A command's stderr (a progress meter) can exceed a pipe's buffer: the shard still arrives."""
    folder = built_root().joinpath(*EVAL)
    shard = json.loads((folder / "manifest.json").read_text())["shards"][0]
    url = f"pipe:head -c 300000 /dev/zero >&2; cat {folder / shard['name']}"
    out = _returns(transport.fetch, url, shard["sha256"], shard["bytes"])
    assert "error" not in out and len(out["value"]) == shard["bytes"]


@pytest.mark.parametrize("damage", ["torn", "flipped"])
def test_a_damaged_cache_file_is_fetched_again(tmp_path, ranged_http, damage):
    """A cached shard cut short (a crash before its bytes reached the disk) or changed since (same size) is
    not read as the shard: the cache fetches it again, and the batches are the local ones."""
    url, _ = ranged_http
    info = open_variant(url, *EVAL)
    cache = tmp_path / "cache"
    _run(info, "eval", 0, 1, 0, cache_dir=str(cache))
    cached = cache / f"{info.manifest['shards'][1]['sha256']}.tar"
    data = cached.read_bytes()
    if damage == "torn":
        cached.write_bytes(data[:len(data) // 3])
    else:
        cached.write_bytes(data[:600] + bytes([data[600] ^ 1]) + data[601:])
    _same(_run(info, "eval", 0, 1, 2, cache_dir=str(cache)), _local("eval", 0, 1))
    assert cached.read_bytes() == data


def test_http_urls_with_a_query_or_unencoded_characters(tmp_path):
    """A query (an access token) stays on every URL built from the folder's (manifest, shards); a path with a
    space or non-ASCII characters is percent-encoded on the wire. Batches are the local ones either way."""
    import shutil
    folder = tmp_path / "données v1 100%" / "cifar10" / "test" / "rank-003"
    shutil.copytree(built_root().joinpath(*EVAL), folder)
    names = [s["name"] for s in json.loads((folder / "manifest.json").read_text())["shards"]]
    pattern = f"{names[0][:-10]}{{000000..{len(names) - 1:06d}}}.tar"
    with http_server(tmp_path, token="s3cr3t") as (url, handler):
        for root, parts in ((f"{url}/données v1 100%?token=s3cr3t", EVAL),  # a literal % that starts no escape
                            (f"{url}/donn%C3%A9es%20v1%20100%25/cifar10/test/rank-003?token=s3cr3t", ()),
                            (f"{url}/données v1 100%/cifar10/test/rank-003/{pattern}?token=s3cr3t", ())):
            info = open_variant(root, *parts)
            assert [u.rsplit("/", 1)[-1] for u in info.urls] == [f"{n}?token=s3cr3t" for n in names]
            for rank in range(2):
                _same(_run(info, "eval", rank, 2, 0), _local("eval", rank, 2))
        assert all(path.endswith("?token=s3cr3t") for _, path, _ in handler.log)


def test_a_cached_shard_handed_out_survives_another_process_evicting_it(tmp_path, ranged_http, monkeypatch):
    """Workers and ranks share one cache folder: another process may evict a shard the moment this one got it
    (a small cache_bytes). What this process was handed must still read whole."""
    from rankshard.preprocess.format.tarindex import open_blob
    url, _ = ranged_http
    info = open_variant(url, *EVAL)
    cache = transport.ShardCache(tmp_path / "cache")
    evict = transport.ShardCache._evict

    def evicted_by_another_process_too(self, keep):
        evict(self, keep)
        for p in self.folder.glob("*.tar"):  # what a concurrent process with a smaller limit would do
            p.unlink()
    monkeypatch.setattr(transport.ShardCache, "_evict", evicted_by_another_process_too)
    shard = info.manifest["shards"][0]
    want = built_root().joinpath(*EVAL, shard["name"]).read_bytes()
    for _ in range(2):  # a download, then (after the file was taken away) a download again
        blob = open_blob(info.urls[0], shard["sha256"], shard["bytes"], cache)
        try:
            assert blob.pread(len(want) + 1, 0) == want
        finally:
            blob.close()


_USE_CACHED = """
import sys
from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format import transport
cache = transport.ShardCache(sys.argv[1])
cache.open(sys.argv[2], sys.argv[3], int(sys.argv[4])).close()
"""


def test_another_process_using_a_cached_shard_does_not_make_this_one_hash_it_again(tmp_path, ranged_http,
                                                                                  monkeypatch):
    """The cache is shared by loader workers and ranks; each verifies a file once. A use elsewhere marks the
    file recently used (its access time) without changing what this process's check remembers (its mtime)."""
    import subprocess
    import sys

    url, _ = ranged_http
    info = open_variant(url, *EVAL)
    shard = info.manifest["shards"][0]
    shard_url = f"{url}/cifar10/test/rank-003/{shard['name']}"
    cache = transport.ShardCache(tmp_path)
    cache.open(shard_url, shard["sha256"], shard["bytes"]).close()
    cached = tmp_path / f"{shard['sha256']}.tar"
    before = cached.stat()
    subprocess.run([sys.executable, "-c", _USE_CACHED, str(tmp_path), shard_url, shard["sha256"], str(shard["bytes"])],
                   check=True, timeout=120)
    after = cached.stat()
    assert after.st_mtime_ns == before.st_mtime_ns

    def no_hashing(*args):
        raise AssertionError("hashed again")

    monkeypatch.setattr(transport.hashlib, "sha256", no_hashing)
    cache.open(shard_url, shard["sha256"], shard["bytes"]).close()


def test_verify_reads_a_variant_over_http_and_names_a_changed_shard(ranged_http):
    from rankshard.preprocess.verify import verify_tree

    url, handler = ranged_http
    variant = f"{url}/cifar10/test/rank-003"
    report = verify_tree(variant, reference_samples=0)
    local = verify_tree(built_root().joinpath(*EVAL), reference_samples=0)
    assert report.ok and [(c.samples, c.shards) for c in report.checks] == [(c.samples, c.shards) for c in local.checks]
    name = json.loads(built_root().joinpath(*EVAL, "manifest.json").read_text())["shards"][0]["name"]
    handler.faults[name] = "changed"
    try:
        report = verify_tree(variant, reference_samples=0)
    finally:
        handler.faults.clear()
    assert not report.ok and any(f"{name}: sha256" in p for p in report.checks[0].problems)
    with pytest.raises(RankshardError, match="cannot list a folder.*name a variant folder"):
        verify_tree(url)  # HTTP cannot list: the root itself is refused with the way out


def test_verify_walks_object_storage_like_a_folder(s3_root):
    import fsspec

    from rankshard.preprocess.verify import verify_tree

    local = verify_tree(built_root(), reference_samples=4)
    remote = verify_tree(s3_root, reference_samples=4)
    assert remote.ok and len(remote.checks) == len(local.checks)
    assert [(c.folder.rsplit("/", 3)[1:], c.samples, c.max_error) for c in remote.checks] == \
        [(str(c.folder).rsplit("/", 3)[1:], c.samples, c.max_error) for c in local.checks]
    fs = fsspec.filesystem("s3")
    stray = f"{s3_root}/cifar10/test/rank-003/test-999999.tar"
    fs.pipe(stray, b"x" * 10240)
    try:
        report = verify_tree(s3_root, reference_samples=0)
    finally:
        fs.rm(stray)
    assert not report.ok and any(f"{stray}: shard not in the manifest" in p for c in report.checks for p in c.problems)
