"""``rankshard-preprocess preview --out FILE``: one split writes exactly FILE; several splits write one file
each (FILE's stem + -<dataset>-<split>), none overwriting another, and every file written is printed."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rankshard.preprocess.cli import main
from rankshard.preprocess.pipeline import ArraySource, materialize_split
from rankshard.preprocess.sources.synth import labelled_images
from rankshard.preprocess.spec import ShardSpec


def _materialize(out: Path, split: str, seed: int) -> None:
    images, labels = labelled_images(1, seed=seed)  # 10 images: enough for a 2-row grid
    info = {"kind": "test", "path": "memory", "fingerprint": f"synth-{split}", "checksum_verified": False}
    source = ArraySource(images, labels, [f"mem:{i}" for i in range(len(labels))], tuple("abcdefghij"), info)
    spec = ShardSpec(dataset="cifar10", split=split, ranks=(2,), shard_size=10, workers=0)
    materialize_split(source, spec, out, show_progress=False)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """cifar10/train and cifar10/test (different images), each with full, rank-002 and spectra."""
    out = tmp_path_factory.mktemp("shards")
    _materialize(out, "train", seed=0)
    _materialize(out, "test", seed=1)
    return out


def _preview(root: Path, out: Path) -> list[Path]:
    result = CliRunner().invoke(main, ["preview", str(root), "--out", str(out), "--count", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    return [Path(line.removeprefix("wrote ")) for line in result.stdout.splitlines()]


def _assert_pngs(paths: list[Path]) -> None:
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG", path
            image.verify()


def test_several_splits_get_one_file_each(shards, tmp_path):
    out = tmp_path / "previews" / "p.png"
    out.parent.mkdir()
    wrote = _preview(shards, out)
    expected = {out.with_name(f"p-cifar10-{split}{tail}.png") for split in ("train", "test") for tail in ("", "-energy")}
    assert set(wrote) == expected and len(wrote) == 4
    # nothing else was written: not FILE itself, not the default preview.png in the split folders
    assert set(out.parent.iterdir()) == expected and not list(shards.rglob("preview*.png"))
    _assert_pngs(wrote)
    # each split's grid shows its own images (and title): neither file is a copy of the other
    assert (out.with_name("p-cifar10-train.png").read_bytes() != out.with_name("p-cifar10-test.png").read_bytes())


def test_one_split_writes_exactly_file(shards, tmp_path):
    out = tmp_path / "figures" / "new" / "grid.png"  # a folder not made yet is created
    wrote = _preview(shards / "cifar10" / "test", out)
    assert wrote == [out, out.with_name("grid-energy.png")]
    _assert_pngs(wrote)


def test_two_runs_under_one_root_stay_apart(tmp_path):
    root = tmp_path / "runs"
    _materialize(root / "a", "train", seed=0)
    _materialize(root / "b", "train", seed=1)
    out = tmp_path / "p.png"
    wrote = _preview(root, out)
    grids = [out.with_name(f"p-{run}-cifar10-train.png") for run in ("a", "b")]
    assert set(wrote) == {*grids, *(g.with_name(g.stem + "-energy.png") for g in grids)}
    _assert_pngs(wrote)
    assert grids[0].read_bytes() != grids[1].read_bytes()


def test_another_tools_manifest_beside_ours_is_not_taken_for_a_split(shards, tmp_path):
    """A data root often holds other datasets; one with its own manifest.json made preview fail (KeyError)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(shards / "cifar10" / "test", root / "cifar10" / "test")
    foreign = root / "coco" / "annotations"
    foreign.mkdir(parents=True)
    (foreign / "manifest.json").write_text('{"version": 3, "files": ["a.json"]}')
    wrote = _preview(root, tmp_path / "out" / "p.png")
    assert wrote == [tmp_path / "out" / "p.png", tmp_path / "out" / "p-energy.png"]  # one split: ours
    _assert_pngs(wrote)


def _damage(split: Path, damage: str) -> str:
    """Damage one thing in ``split``; returns the message preview must give."""
    from rankshard.preprocess.format.tarindex import scan_shard

    full = split / "full"
    if damage == "missing shard":
        (full / "test-000000.tar").unlink()
        return f"{full / 'test-000000.tar'}: cannot be read (No such file or directory)"
    if damage == "manifest key":  # one flipped bit in a key
        (full / "manifest.json").write_text((full / "manifest.json").read_text().replace('"sha256"', '"sha25v"', 1))
        return f"{full / 'manifest.json'}: incomplete manifest (shard entry 0 has no usable sha256)"
    folder = split / ("spectra" if damage == "spectrum header" else "full")
    shard = folder / "test-000000.tar"
    index = scan_shard(shard)
    ext, truth, lie = ("s.npy", b"(3, 32)", b"(3, 22)") if damage == "spectrum header" else ("png", b"IHDR", b"IHDS")
    offset, size = index.members[3][ext]
    data = bytearray(shard.read_bytes())
    at = offset + data[offset:offset + size].index(truth)
    data[at:at + len(lie)] = lie
    shard.write_bytes(bytes(data))
    return f"{folder}: sample {index.keys[3]} does not decode"


@pytest.mark.parametrize("damage", ["missing shard", "manifest key", "sample", "spectrum header"])
def test_a_damaged_split_is_named_not_a_traceback(shards, tmp_path, damage):
    """preview reads the shards without their sha256 (verify does that): a damaged one was a FileNotFoundError,
    a KeyError, PIL's UnidentifiedImageError or numpy's 'all input arrays must have the same shape'."""
    import shutil

    split = tmp_path / "data" / "cifar10" / "test"
    shutil.copytree(shards / "cifar10" / "test", split)
    message = _damage(split, damage)
    result = CliRunner().invoke(main, ["preview", str(split), "--out", str(tmp_path / "p.png"), "--count", "4",
                                       "--quiet"])
    assert result.exit_code == 2 and f"error: {message}" in result.output.replace("\n", ""), result.output
