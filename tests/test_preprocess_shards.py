import errno
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from rankshard.preprocess.errors import RankshardError
from rankshard.preprocess.format.pngenc import encode_png_batch
from rankshard.preprocess.format.tar import partial_name, write_shard
from rankshard.preprocess.format.tarindex import read_shard
from rankshard.preprocess.sources.synth import class_images


def _samples(n=5):
    return [(f"{i:08d}", {"cls": str(i % 3).encode(), "json": b"{}", "npy": bytes([i]) * (100 + i)})
            for i in range(n)]


def test_tarfile_reads_members_in_order_with_fixed_metadata(tmp_path):
    rec = write_shard(tmp_path / "a.tar", _samples())
    with tarfile.open(tmp_path / "a.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:3]] == ["00000000.cls", "00000000.json", "00000000.npy"]
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o644 for m in members)
        assert tar.extractfile(members[5]).read() == bytes([1]) * 101
    assert rec.num_samples == 5 and rec.bytes == (tmp_path / "a.tar").stat().st_size
    assert rec.bytes % 10240 == 0


def test_webdataset_reads_back_every_sample(tmp_path):
    write_shard(tmp_path / "a.tar", _samples(7))
    got = list(wds.WebDataset(str(tmp_path / "a.tar"), shardshuffle=False))
    assert [s["__key__"] for s in got] == [f"{i:08d}" for i in range(7)]
    assert got[3]["npy"] == bytes([3]) * 103 and got[3]["cls"] == b"0"


def test_same_samples_give_identical_bytes(tmp_path):
    a = write_shard(tmp_path / "a.tar", _samples())
    b = write_shard(tmp_path / "b.tar", _samples())
    assert a.sha256 == b.sha256
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


def test_failure_mid_write_leaves_nothing(tmp_path):
    def broken():
        yield from _samples(2)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError):
        write_shard(tmp_path / "a.tar", broken())
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_a_clear_error_and_keeps_no_partial(tmp_path, monkeypatch):
    real_open = open

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()

    def fake_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return FullDisk(f) if "w" in mode and str(path).endswith(".partial") else f

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(RankshardError, match="disk is full"):
        write_shard(tmp_path / "a.tar", _samples())
    assert not (tmp_path / "a.tar").exists() and not partial_name(tmp_path / "a.tar").exists()


def test_keys_with_dots_are_refused(tmp_path):
    with pytest.raises(ValueError, match="invalid sample key"):
        write_shard(tmp_path / "a.tar", [("a.b", {"cls": b"1"})])


def test_read_shard_groups_members(tmp_path):
    write_shard(tmp_path / "a.tar", _samples(3))
    got = read_shard(tmp_path / "a.tar")
    assert [k for k, _ in got] == ["00000000", "00000001", "00000002"]
    assert sorted(got[1][1]) == ["cls", "json", "npy"]


@pytest.mark.parametrize("size", [(32, 32), (17, 40), (1, 1)])
@pytest.mark.parametrize("level", [0, 1, 9])
def test_png_encoder_is_lossless_for_pil(size, level):
    images = class_images(4, 3, size=size)
    for png, img in zip(encode_png_batch(images, level), images):
        with Image.open(io.BytesIO(png)) as im:
            assert im.mode == "RGB" and im.format == "PNG"
            assert np.array_equal(np.asarray(im), img)
