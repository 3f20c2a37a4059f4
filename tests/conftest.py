"""Shared pytest setup: tests marked ``gpu`` are skipped where no CUDA device is present; one torch thread;
nothing may be written into the working directory; the shared materialization (``loaders_shards.built_root``)
served over HTTP and S3 by real servers on 127.0.0.1 (``ranged_http``, ``s3_root``)."""
from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets on a shared 2-core machine: extra intra-op threads only contend (use via usefixtures)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_LEFT_BY_TOOLS = {".pytest_cache", "__pycache__", ".venv", "build", "dist", ".git"}


def _working_dir_entries() -> set[str]:
    return {p.name for p in Path.cwd().iterdir() if p.name not in _LEFT_BY_TOOLS and not p.name.endswith(".egg-info")}


@pytest.fixture(scope="session", autouse=True)
def nothing_written_into_the_working_directory():
    """Tests write under tmp_path only: a default output folder in the user's working directory (the first
    release's ``weights-report/``) is a bug, and this fails the session when one appears."""
    before = _working_dir_entries()
    yield
    new = sorted(_working_dir_entries() - before)
    assert not new, f"tests wrote into the working directory {Path.cwd()}: {new}"


@pytest.fixture(scope="module")
def ranged_http():
    """``built_root()`` over HTTP with Range support: ``(base URL, handler class)`` (faults per path, request log)."""
    from loaders_shards import built_root
    from remote_servers import http_server

    with http_server(built_root(), ranged=True) as (url, handler):
        yield url, handler


@pytest.fixture(scope="module")
def s3_root():
    """``built_root()`` uploaded to moto's S3 server: the URL of its copy, ``s3://rankshard-test/shards``."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from loaders_shards import built_root
    from remote_servers import s3_bucket, upload_folder

    with s3_bucket("rankshard-test"):
        upload_folder(built_root(), "s3://rankshard-test/shards")
        yield "s3://rankshard-test/shards"
