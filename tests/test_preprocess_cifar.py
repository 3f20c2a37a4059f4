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


class _Uninitialized:
    """Pickles as numpy's own reconstruction of an empty array of ``shape``: a few bytes that allocate it all."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, np.dtype(dtype)

    def __reduce__(self):
        return np.zeros(0).__reduce__()[0], (np.ndarray, self.shape, self.dtype)  # numpy's _reconstruct


def _extracted(archive, tmp_path):
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / FOLDER


@pytest.mark.parametrize("name, batch", [
    ("test_batch", {b"data": ["a"] * 3072, b"labels": [1]}),              # was a ValueError (int('a'))
    ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": 5}),  # was a TypeError (len of 0-d)
    ("test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 99]}),  # an IndexError when written
    ("test_batch", {b"data": _Uninitialized((20_000, 3072), "u1"), b"labels": _Uninitialized((20_000,), "i8")}),
    ("batches.meta", {b"num_cases_per_batch": 10}),                      # was a KeyError (label_names)
    ("batches.meta", {b"label_names": [b"\xff\xfe"]}),
])
def test_a_batch_that_is_no_cifar_batch_is_refused(archive, tmp_path, name, batch):
    """With --no-verify-md5 a modified copy is accepted deliberately; one that does not hold what a CIFAR-10
    batch holds is still a SourceError (a 300-byte pickle of a 60 MB array is refused before it is copied)."""
    folder = _extracted(archive, tmp_path)
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(SourceError, match=f"{name}: |labels 0..99"):
        load_cifar10(tmp_path, "test", verify_md5=False)


def test_a_key_that_is_not_text_is_ignored_not_a_unicode_error(archive, tmp_path):
    folder = _extracted(archive, tmp_path)
    batch = pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")
    (folder / "test_batch").write_bytes(pickle.dumps({**batch, b"\xff\xfe": 1}, protocol=2))
    assert len(load_cifar10(tmp_path, "test", verify_md5=False).labels) == 20


def test_damaged_batches_load_whole_or_are_a_source_error(archive, tmp_path):
    """Property test (--no-verify-md5): the test batch and batches.meta cut at 32 lengths and flipped at 256
    bits each load as arrays of the stored shapes, with labels of the classes, or raise SourceError; never
    another exception or a hang. (With the md5 check, the default, every one of them is an md5 mismatch.)"""
    from fuzzing import corruptions, deadline

    folder = _extracted(archive, tmp_path)
    good = load_cifar10(tmp_path, "test", verify_md5=False)
    for name in ("test_batch", "batches.meta"):
        original = (folder / name).read_bytes()
        for damaged in corruptions(original, cuts=32, flips=256):
            (folder / name).write_bytes(damaged)
            with deadline(5):
                try:
                    got = load_cifar10(tmp_path, "test", verify_md5=False)
                except SourceError:
                    continue
            assert got.images.shape == good.images.shape and got.images.dtype == np.uint8, name
            assert got.labels.shape == good.labels.shape and 0 <= got.labels.min() <= got.labels.max() < len(got.classes)
        (folder / name).write_bytes(original)
