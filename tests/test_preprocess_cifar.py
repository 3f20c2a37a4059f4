import os
import pickle
import tarfile

import numpy as np
import pytest

from rankshard.preprocess.sources.cifar import FOLDER, download_cifar10, load_cifar10, safe_unpickle, write_cifar10_archive
from rankshard.preprocess.errors import SourceError
from rankshard.preprocess.sources.synth import labelled_images


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cifar")
    return write_cifar10_archive(folder / "cifar-10-python.tar.gz", labelled_images(5), labelled_images(2, seed=1))


def test_reads_archive_in_source_order(archive):
    train = load_cifar10(archive, "train", verify_md5=False)
    images, labels = labelled_images(5)
    assert np.array_equal(train.images, images) and np.array_equal(train.labels, labels)
    assert train.classes[0] == "airplane" and train.source_ids[0] == "data_batch_1:0"
    assert len(load_cifar10(archive, "test", verify_md5=False).labels) == 20


def test_reads_extracted_folder_identically(archive, tmp_path):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    a = load_cifar10(archive, "train", verify_md5=False)
    b = load_cifar10(tmp_path, "train", verify_md5=False)
    assert np.array_equal(a.images, b.images) and a.fingerprint == b.fingerprint


def test_md5_mismatch_is_reported_with_the_fix(archive):
    with pytest.raises(SourceError, match="published CIFAR-10 file has c99cafc1.*--no-verify-md5"):
        load_cifar10(archive, "train")


def test_truncated_archive_is_a_clear_error(archive, tmp_path):
    cut = tmp_path / "cifar-10-python.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(SourceError, match="truncated or corrupt"):
        load_cifar10(cut, "train", verify_md5=False)


def test_missing_source_says_what_to_pass(tmp_path):
    with pytest.raises(SourceError, match="--download"):
        load_cifar10(tmp_path / "nowhere", "train")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="refusing to unpickle posix.system|refusing to unpickle os.system"):
        safe_unpickle(pickle.dumps({b"data": _Exploit()}), "data_batch_1")
    assert not (tmp_path / "pwned").exists()


def test_malicious_batch_inside_folder_is_refused(archive, tmp_path, monkeypatch):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    (tmp_path / FOLDER / "data_batch_2").write_bytes(pickle.dumps({b"data": _Exploit()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceError, match="refusing to unpickle"):
        load_cifar10(tmp_path, "train", verify_md5=False)
    assert not (tmp_path / "pwned").exists()


def test_download_from_a_reachable_url(archive, tmp_path):
    got = download_cifar10(tmp_path, url=archive.as_uri(), md5=None)
    assert got.read_bytes() == archive.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["cifar-10-python.tar.gz"]


def test_download_without_network_fails_clearly_and_leaves_nothing(tmp_path):
    with pytest.raises(SourceError, match="could not download.*no internet access"):
        download_cifar10(tmp_path, url="http://127.0.0.1:9/cifar-10-python.tar.gz", timeout=2)
    assert list(tmp_path.iterdir()) == []


def test_download_with_wrong_md5_is_refused(archive, tmp_path):
    with pytest.raises(SourceError, match="md5 differs"):
        download_cifar10(tmp_path, url=archive.as_uri(), md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["data_batch_1", "batches.meta"])
def test_oversized_members_are_refused_before_they_are_read(tmp_path, name):
    import io

    from rankshard.preprocess.sources.cifar import MAX_BATCH_BYTES, MAX_META_BYTES

    size = (MAX_META_BYTES if name == "batches.meta" else MAX_BATCH_BYTES) + 1
    bomb = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:  # zeros: a small file that inflates to more than the cap
        info = tarfile.TarInfo(f"{FOLDER}/{name}")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    assert bomb.stat().st_size < 200_000
    with pytest.raises(SourceError, match=f"declares {size:,} bytes, more than a genuine CIFAR-10 {name}"):
        load_cifar10(bomb, "train")
