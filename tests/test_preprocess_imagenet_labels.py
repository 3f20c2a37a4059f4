"""ImageNet label files as people have them: Kaggle's download as it unpacks, files re-saved on Windows,
damaged or foreign files (refused naming the line, never a traceback), and --devkit naming a file."""
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from rankshard.preprocess.cli import main
from rankshard.preprocess.errors import SourceError
from rankshard.preprocess.imagejob import imagenet_source
from rankshard.preprocess.sources.images import Geometry
from rankshard.preprocess.sources.synthtree import WNIDS, write_flat_val, write_train_tree

GEOMETRY = Geometry(24, 24)
NAMES = ("tench, Tinca tinca", "goldfish", "great white shark")


def _kaggle_root(root: Path) -> list[int]:
    """Kaggle's imagenet-object-localization-challenge as it unpacks: LOC_* at the root, images under ILSVRC/."""
    labels = write_flat_val(root / "ILSVRC/Data/CLS-LOC/val", classes=3, count=6)
    write_train_tree(root / "ILSVRC/Data/CLS-LOC/train", classes=3, per_class=1, odd=False)
    (root / "LOC_synset_mapping.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(WNIDS, NAMES)))
    (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "".join(
        f"ILSVRC2012_val_{i + 1:08d},{WNIDS[y]} 1 2 3 4 {WNIDS[y]} 5 6 7 8 \n" for i, y in enumerate(labels)))
    return labels


def _labels_by_name(src) -> dict[str, int]:
    return dict(zip((Path(i).name for i in src.listing.ids), src.listing.label.tolist()))


def _expected(labels) -> dict[str, int]:
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": y for i, y in enumerate(labels)}


def test_kaggle_download_root_finds_the_loc_files_at_its_top(tmp_path):
    labels = _kaggle_root(tmp_path)
    val = imagenet_source(tmp_path, "val", GEOMETRY, None)
    assert _labels_by_name(val) == _expected(labels) and val.classes == WNIDS[:3]
    train = imagenet_source(tmp_path, "train", GEOMETRY, None)
    assert train.class_names == NAMES  # the readable names come from LOC_synset_mapping.txt too
    direct = imagenet_source(tmp_path / "ILSVRC" / "Data" / "CLS-LOC" / "val", "val", GEOMETRY, None)
    assert _labels_by_name(direct) == _expected(labels)  # the split folder itself: LOC_* 4 levels up


def test_kaggle_files_saved_with_bom_and_crlf_give_the_same_labels(tmp_path):
    labels = _kaggle_root(tmp_path)
    for name in ("LOC_synset_mapping.txt", "LOC_val_solution.csv"):
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    val = imagenet_source(tmp_path, "val", GEOMETRY, None)
    assert _labels_by_name(val) == _expected(labels)
    assert val.classes == WNIDS[:3] and val.class_names == NAMES


@pytest.mark.parametrize("damage, message", [
    (("LOC_val_solution.csv", "n01443537 1 2 3 4 n01443537", "n09999999 1 2 3 4 n09999999"), "line 2 "),
    (("LOC_val_solution.csv", "n01443537 1 2 3 4 n01443537 5 6 7 8 ", ""), "line 2 "),
    (("LOC_val_solution.csv", "n01443537 1 2 3 4 n01443537", "n01443537 1 2 3 4 n01440764"), "of one wnid"),
    (("LOC_val_solution.csv", "ImageId,PredictionString", "id,boxes"), "expected the header"),
    (("LOC_synset_mapping.txt", "n01440764 tench", "tench"), "not a wnid"),
])
def test_damaged_kaggle_files_are_refused_naming_the_problem(tmp_path, damage, message):
    _kaggle_root(tmp_path)
    name, old, new = damage
    text = (tmp_path / name).read_text()
    assert old in text
    (tmp_path / name).write_text(text.replace(old, new, 1))
    with pytest.raises(SourceError, match=message):
        imagenet_source(tmp_path, "val", GEOMETRY, None)
    result = CliRunner().invoke(main, ["imagenet", "--source", str(tmp_path), "--split", "val", "--out",
                                       str(tmp_path / "out"), "--ranks", "3", "--crop", "24", "--workers", "0"])
    assert result.exit_code == 2 and f"error: {tmp_path / name}" in result.output, result.output



@pytest.mark.parametrize("name, old, new, message", [
    ("LOC_synset_mapping.txt", b"n01440764", b"n\xb01440764", "not UTF-8 text"),   # were UnicodeDecodeErrors
    ("LOC_val_solution.csv", b"ImageId", b"I\xedageId", "not UTF-8 text"),
    ("LOC_val_solution.csv", b"ILSVRC2012_val_00000001,", b'"' + b"x" * 200_000 + b'",', "field larger than field limit"),
    ("LOC_val_solution.csv", b"ImageId,PredictionString", b"PredictionString,ImageId\nn01440764 1 2 3 4",
     "has no ImageId"),                                                              # was an AttributeError
])
def test_kaggle_files_that_are_not_text_or_csv_are_refused(tmp_path, name, old, new, message):
    _kaggle_root(tmp_path)
    data = (tmp_path / name).read_bytes()
    assert old in data
    (tmp_path / name).write_bytes(data.replace(old, new, 1))
    with pytest.raises(SourceError, match=f"{tmp_path / name}: .*{message}"):
        imagenet_source(tmp_path, "val", GEOMETRY, None)

def _devkit_tar_gz(path: Path, labels: list[int]) -> None:
    """ILSVRC2012_devkit_t12.tar.gz with meta.mat (IDs not in sorted-wnid order) and the ground truth."""
    scipy_io = pytest.importorskip("scipy.io")
    recs = np.zeros((3, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for i in range(3):  # wnid i has ILSVRC2012_ID 3 - i
        recs[i, 0] = (np.array([[3.0 - i]]), WNIDS[i], NAMES[i], np.array([[0.0]]))
    mat = io.BytesIO()
    scipy_io.savemat(mat, {"synsets": recs})
    truth = "".join(f"{3 - y}\n" for y in labels).encode()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("meta.mat", mat.getvalue()), ("ILSVRC2012_validation_ground_truth.txt", truth)):
            info = tarfile.TarInfo(f"ILSVRC2012_devkit_t12/data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))



def test_a_truncated_devkit_archive_is_refused_naming_it(tmp_path):
    labels = write_flat_val(tmp_path / "val", classes=3, count=6)
    archive = tmp_path / "ILSVRC2012_devkit_t12.tar.gz"
    _devkit_tar_gz(archive, labels)
    archive.write_bytes(archive.read_bytes()[:-40])  # was gzip's EOFError
    with pytest.raises(SourceError, match=f"{archive}: the archive is truncated or corrupt"):
        imagenet_source(tmp_path / "val", "val", GEOMETRY, None, devkit=tmp_path)


def test_damaged_label_files_read_or_are_a_source_error(tmp_path):
    """Property test: Kaggle's two label files and the devkit archive cut at 32 lengths and flipped at 256 bits
    each: the damaged archive reads as the original or is a SourceError (gzip checks its bytes); text files
    have no checksum, so they give labels of listed wnids (a flipped digit is another image id) or a
    SourceError. Never another exception or a hang."""
    from fuzzing import corruptions, deadline
    from rankshard.preprocess.sources.imagenet import find_val_labels

    _kaggle_root(tmp_path / "kaggle")
    labels = write_flat_val(tmp_path / "devkit" / "val", classes=3, count=6)
    _devkit_tar_gz(tmp_path / "devkit" / "ILSVRC2012_devkit_t12.tar.gz", labels)
    for folder, name in (("kaggle", "LOC_val_solution.csv"), ("kaggle", "LOC_synset_mapping.txt"),
                         ("devkit", "ILSVRC2012_devkit_t12.tar.gz")):
        path = tmp_path / folder / name
        good = path.read_bytes()
        original = find_val_labels([tmp_path / folder])
        for damaged in corruptions(good, cuts=32, flips=256):
            path.write_bytes(damaged)
            with deadline(5):
                try:
                    got = find_val_labels([tmp_path / folder])
                except SourceError:
                    continue
            if name.endswith(".gz"):
                assert got == original
            else:
                assert got is not None and set(got.by_stem.values()) <= set(got.wnids), name
        path.write_bytes(good)

def test_devkit_option_may_name_the_devkit_archive_itself(tmp_path):
    labels = write_flat_val(tmp_path / "images" / "val", classes=3, count=6)
    (tmp_path / "dl").mkdir()
    _devkit_tar_gz(tmp_path / "dl" / "ILSVRC2012_devkit_t12.tar.gz", labels)
    src = imagenet_source(tmp_path / "images" / "val", "val", GEOMETRY, None,
                          devkit=tmp_path / "dl" / "ILSVRC2012_devkit_t12.tar.gz")
    assert _labels_by_name(src) == _expected(labels) and src.class_names == NAMES


def test_a_ground_truth_that_is_not_ids_is_refused(tmp_path):
    labels = write_flat_val(tmp_path / "val", classes=3, count=6)
    _devkit_tar_gz(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", labels)
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    with tarfile.open(tmp_path / "ILSVRC2012_devkit_t12.tar.gz") as tar:
        (data / "meta.mat").write_bytes(tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read())
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("n01440764\n" * 6)
    with pytest.raises(SourceError, match="one integer ILSVRC2012_ID per line"):
        imagenet_source(tmp_path, "val", GEOMETRY, None)


def _meta_mat_bytes(compressed: bool) -> bytes:
    scipy_io = pytest.importorskip("scipy.io")
    recs = np.zeros((3, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for i in range(3):
        recs[i, 0] = (np.array([[i + 1.0]]), WNIDS[i], NAMES[i], np.array([[0.0]]))
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": recs}, do_compression=compressed)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_a_meta_mat_that_lies_about_sizes_is_refused_never_a_crash(compressed):
    """Every truncation and every 4-byte word replaced by 0, 2^31-1 or 2^32-1: parsed or SourceError."""
    import struct
    import warnings

    from rankshard.preprocess.sources.imagenet import devkit_synsets

    good = _meta_mat_bytes(compressed)
    assert len(devkit_synsets(good)) == 3
    damaged = [good[:n] for n in range(128, len(good))]
    for pos in range(128, len(good) - 3, 4):
        for value in (0, 0x7FFFFFFF, 0xFFFFFFFF):
            data = bytearray(good)
            struct.pack_into("<I", data, pos, value)
            damaged.append(bytes(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # float -> int casts of garbage
        for data in damaged:
            try:
                devkit_synsets(data)
            except SourceError as exc:
                assert str(exc).startswith("meta.mat: ")


@pytest.mark.parametrize("extension", [".JPG", ".png"])
def test_a_flat_val_folder_passed_itself_is_found_whatever_its_image_extension(tmp_path, extension):
    labels = write_flat_val(tmp_path / "val", classes=3, count=6)
    for path in (tmp_path / "val").iterdir():  # e.g. val converted to PNG, or renamed on a case-folding disk
        path.rename(path.with_suffix(extension))
    _devkit_tar_gz(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", labels)
    src = imagenet_source(tmp_path / "val", "val", GEOMETRY, None, devkit=tmp_path)
    assert {Path(i).stem: y for i, y in zip(src.listing.ids, src.listing.label.tolist())} == \
        {Path(name).stem: y for name, y in _expected(labels).items()}


def test_a_meta_mat_zip_bomb_is_refused_without_inflating_it():
    import struct
    import zlib

    from rankshard.preprocess.sources.imagenet import devkit_synsets
    from rankshard.preprocess.sources.matfile import MAX_INFLATED

    header = _meta_mat_bytes(True)[:128]
    bomb = zlib.compress(b"\0" * (MAX_INFLATED + (1 << 20)), 9)  # ~65 kB that inflate past the cap
    element = struct.pack("<II", 15, len(bomb)) + bomb
    with pytest.raises(SourceError, match="inflates to more than"):
        devkit_synsets(header + element)


def test_a_truncated_compressed_meta_mat_element_is_named_as_such():
    import struct

    from rankshard.preprocess.sources.imagenet import devkit_synsets

    good = _meta_mat_bytes(True)
    size = struct.unpack_from("<I", good, 132)[0]  # the first element's tag: type 15, then its byte count
    payload = good[136:136 + size][: size // 2]
    with pytest.raises(SourceError, match="compressed element is truncated"):
        devkit_synsets(good[:128] + struct.pack("<II", 15, len(payload)) + payload)



def _mat_matrix(mclass: int, dims: tuple[int, ...], name: bytes, body: bytes) -> bytes:
    """One level-5 MAT matrix element (little-endian): flags, dims, name, then ``body`` (its data elements)."""
    import struct

    def numeric(mtype: int, data: bytes) -> bytes:
        return struct.pack("<II", mtype, len(data)) + data + b"\0" * (-len(data) % 8)

    inner = numeric(6, struct.pack("<II", mclass, 0)) + numeric(5, struct.pack(f"<{len(dims)}i", *dims)) \
        + numeric(1, name) + body
    return struct.pack("<II", 14, len(inner)) + inner


def _mat_compressed(element: bytes) -> bytes:
    import struct
    import zlib

    packed = zlib.compress(element, 9)
    return struct.pack("<II", 15, len(packed)) + packed


@pytest.mark.parametrize("element, message", [
    # a 5-character string whose dims say 83886336 rows of none: built 84 million empty rows
    (_mat_matrix(4, (83886336, 0), b"synsets", b"\x01\x00\x05\x00hello\0\0\0"), "char array holds 5 characters"),
    # a struct array without fields, of 2^40 elements: appended empty records until memory ran out
    (_mat_matrix(2, (1 << 20, 1 << 20), b"synsets", b"\x05\x00\x04\x00\x20\0\0\0" + b"\x01\x00\0\0\0\0\0\0"),
     "struct array of 1,099,511,627,776 elements"),
    # 100 compressed elements of 1 MB each inside one that inflates to 100 kB: each under the cap, 100 MB held
    # (2,000 of them, 5 kB of file, held 2 GB)
    (_mat_compressed(_mat_matrix(1, (100, 1), b"synsets", 100 * _mat_compressed(
        _mat_matrix(6, (1 << 17, 1), b"", b"\x09\0\0\0\0\0\x10\0" + bytes(1 << 20))))),
     "inflates to more than"),
])
def test_a_meta_mat_whose_sizes_lie_is_refused_quickly(element, message):
    from fuzzing import deadline
    from rankshard.preprocess.sources.imagenet import devkit_synsets

    with deadline(3), pytest.raises(SourceError, match=message):
        devkit_synsets(_meta_mat_bytes(True)[:128] + element)


def test_an_infinite_class_id_in_meta_mat_is_refused():
    scipy_io = pytest.importorskip("scipy.io")
    recs = np.zeros((1, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    recs[0, 0] = (np.array([[np.inf]]), WNIDS[0], NAMES[0], np.array([[0.0]]))  # was int(inf): an OverflowError
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": recs})
    from rankshard.preprocess.sources.imagenet import devkit_synsets

    with pytest.raises(SourceError, match="lacks a usable ILSVRC2012_ID"):
        devkit_synsets(buf.getvalue())

def test_two_files_of_one_validation_id_are_refused_naming_both(tmp_path):
    labels = write_flat_val(tmp_path / "val", classes=3, count=6)
    first = tmp_path / "val" / "ILSVRC2012_val_00000002.JPEG"
    first.with_suffix(".png").write_bytes(first.read_bytes())  # a conversion left beside its original
    _devkit_tar_gz(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", labels)
    with pytest.raises(SourceError, match=r"two images of validation id ILSVRC2012_val_00000002: "
                                          r"ILSVRC2012_val_00000002\.JPEG and ILSVRC2012_val_00000002\.png"):
        imagenet_source(tmp_path / "val", "val", GEOMETRY, None, devkit=tmp_path)


def test_a_flat_val_listing_cached_before_the_duplicate_rule_is_built_again(tmp_path):
    """The refusal above lives in the listing; a listing cached by an older version would skip it. Flat-val cache
    keys carry the rules' version (a val listing is quick to rebuild); train keys do not (minutes to rebuild)."""
    from rankshard.preprocess.sources import imagenet

    labels = write_flat_val(tmp_path / "val", classes=3, count=6)
    write_train_tree(tmp_path / "train", classes=3, per_class=1, odd=False)
    _devkit_tar_gz(tmp_path / "ILSVRC2012_devkit_t12.tar.gz", labels)
    val = imagenet.signature(imagenet.detect(tmp_path / "val", "val", tmp_path))
    train = imagenet.signature(imagenet.detect(tmp_path, "train"))
    assert val["flat_rules"] == imagenet.FLAT_RULES == 2 and "flat_rules" not in train
