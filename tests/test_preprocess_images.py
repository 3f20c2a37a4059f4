import io

import numpy as np
import pytest
from PIL import Image

from rankshard.preprocess.sources.images import BadImage, Geometry, decode, open_image, transform
from rankshard.preprocess.sources.matfile import read_mat
from rankshard.preprocess.sources.synth import class_images
from rankshard.preprocess.sources.listing import read_bytes
from rankshard.preprocess.sources.synthtree import bomb_png, hostile_files, odd_files, strip_png

IMAGE = class_images(2, 1, (40, 56), seed=5)[0]


@pytest.mark.parametrize("name", sorted(odd_files(IMAGE)))
def test_each_odd_file_decodes_or_is_refused_with_its_reason(name):
    data, outcome = odd_files(IMAGE)[name]
    geometry = Geometry(32, 32)
    if outcome == "ok":
        out = decode(data, geometry)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    else:
        with pytest.raises(BadImage, match=outcome):
            decode(data, geometry)


def test_mode_conversions_match_independent_formulas():
    # greyscale: R = G = B = L
    gray = open_image(odd_files(IMAGE)["odd_gray.JPEG"][0])
    arr = np.asarray(gray)
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    # RGBA at alpha 128 composited on white: out = (c * a + 255 * (255 - a)) / 255
    rgba = np.concatenate([IMAGE, np.full(IMAGE.shape[:2] + (1,), 128, np.uint8)], axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    out = np.asarray(open_image(buf.getvalue())).astype(np.float64)
    ref = (IMAGE.astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(out - ref).max() <= 1.0
    # 16-bit greyscale scales 0..65535 to 0..255 instead of clipping
    wide = Image.fromarray(IMAGE[..., 0].astype(np.uint16) * 257)
    buf = io.BytesIO()
    wide.save(buf, "PNG")
    assert np.abs(np.asarray(open_image(buf.getvalue()))[..., 0].astype(int) - IMAGE[..., 0]).max() <= 1
    # a PNG named .JPEG decodes by content and is lossless
    assert (np.asarray(open_image(odd_files(IMAGE)["odd_png_named.JPEG"][0])) == IMAGE).all()


def test_bomb_is_refused_before_decoding_and_limit_is_configurable():
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(bomb_png(20_000, 20_000))       # 4e8 pixels: under PIL's own error threshold, over ours
    png = odd_files(IMAGE)["odd_png_named.JPEG"][0]
    with pytest.raises(BadImage, match="40x56|56x40"):
        open_image(png, max_pixels=1000)


@pytest.mark.parametrize("side", [10_000, 14_000])  # over PIL's own warning (89.5 M) and error (179 M) limits
def test_max_pixels_above_pils_default_is_honoured(side):
    """A header-only bomb_png declares side^2 pixels: allowed by --max-pixels, it gets past the size check
    and fails only as the truncated file it is; under the limit's default it is a bomb, naming the option."""
    with pytest.raises(BadImage, match="corrupt or truncated"):
        open_image(bomb_png(side, side), max_pixels=side * side)
    with pytest.raises(BadImage, match="decompression bomb.*--max-pixels"):
        open_image(bomb_png(side, side))
    assert Image.MAX_IMAGE_PIXELS >= 89_478_485  # PIL's own check raised, never lowered or turned off
    with pytest.raises(BadImage, match=f"declares {side}x{side} = {side * side:,} pixels > limit 50,000,000"):
        open_image(bomb_png(side, side), max_pixels=50_000_000)  # below PIL's own limit: our message, not PIL's


@pytest.mark.parametrize("size", [(40, 56), (56, 40), (37, 37)])
def test_geometry_is_shorter_side_resize_then_center_crop(size):
    h, w = size
    img = class_images(1, 1, size, seed=2)[0]
    g = Geometry(resize=30, crop=24)
    out = transform(Image.fromarray(img), g)
    # reference: torchvision's formulas, written out
    short, long = min(h, w), max(h, w)
    new_long = int(30 * long / short)
    new_w, new_h = (30, new_long) if w <= h else (new_long, 30)
    resized = np.asarray(Image.fromarray(img).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - 24) / 2.0)), int(round((new_w - 24) / 2.0))
    assert out.shape == (24, 24, 3)
    assert (out == resized[top:top + 24, left:left + 24]).all()


def test_resize_is_antialiased():
    # a one-pixel checkerboard shrunk 4x must average to grey, not alias into a pattern
    board = ((np.indices((128, 128)).sum(0) % 2) * 255).astype(np.uint8)
    out = transform(Image.fromarray(np.stack([board] * 3, -1)), Geometry(32, 32)).astype(float)
    assert abs(out.mean() - 127.5) < 3 and out.std() < 3


def test_geometry_rejects_crop_larger_than_resize():
    with pytest.raises(ValueError, match="resize >= crop"):
        Geometry(200, 224)


def _meta_mat(compressed: bool) -> bytes:
    scipy_io = pytest.importorskip("scipy.io")
    recs = np.zeros((4, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    rows = [(1, "n01440764", "tench, Tinca tinca", 0), (2, "n01443537", "goldfish, Carassius auratus", 0),
            (3, "n01484850", "great white shark", 0), (1001, "n00001740", "entity", 3)]
    for i, (sid, wnid, words, children) in enumerate(rows):
        recs[i, 0] = (np.array([[sid]], dtype=np.float64), wnid, words, np.array([[children]], dtype=np.float64))
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"synsets": recs}, do_compression=compressed)
    return buf.getvalue()


@pytest.mark.parametrize("compressed", [False, True])
def test_mat_reader_against_scipy_written_devkit_meta(compressed):
    from rankshard.preprocess.sources.imagenet import devkit_synsets

    mat = read_mat(_meta_mat(compressed))
    assert mat["synsets"].dims == (4, 1) and mat["synsets"].fields[:2] == ["ILSVRC2012_ID", "WNID"]
    assert devkit_synsets(_meta_mat(compressed)) == {
        1: ("n01440764", "tench, Tinca tinca"), 2: ("n01443537", "goldfish, Carassius auratus"),
        3: ("n01484850", "great white shark")}


def test_mat_reader_numeric_and_char_arrays_against_scipy():
    scipy_io = pytest.importorskip("scipy.io")
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    buf = io.BytesIO()
    scipy_io.savemat(buf, {"a": a, "s": "hello", "i": np.array([[7]], dtype=np.int32)})
    mat = read_mat(buf.getvalue())
    assert np.array_equal(np.asarray(mat["a"].data).reshape(mat["a"].dims, order="F"), a)
    assert mat["s"].scalar() == "hello" and mat["i"].scalar() == 7


def test_mat_reader_refuses_other_files():
    from rankshard.preprocess.errors import SourceError

    with pytest.raises(SourceError, match="level-5 MAT-file"):
        read_mat(b"not a mat file" * 20)


@pytest.mark.parametrize("name", sorted(hostile_files()))
def test_hostile_sizes_are_refused_before_decoding(name):
    data, reason = hostile_files()[name]
    with pytest.raises(BadImage, match=reason):
        decode(data, Geometry(256, 224))


def test_aspect_rule_admits_up_to_its_limit_and_states_it():
    assert decode(strip_png(80, 4), Geometry(32, 32)).shape == (32, 32, 3)       # 20:1 exactly
    with pytest.raises(BadImage, match="more than 20:1"):
        decode(strip_png(81, 4), Geometry(32, 32))
    with pytest.raises(ValueError, match="max-pixels"):
        Geometry(32, 32, max_pixels=0)


def test_files_larger_than_any_admissible_image_are_not_read(tmp_path):
    geometry = Geometry(32, 32, max_pixels=1000)
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (geometry.max_file_bytes + 1))
    with pytest.raises(BadImage, match="refused before reading"):
        read_bytes(str(big), 0, -1, max_bytes=geometry.max_file_bytes)
    with pytest.raises(BadImage, match="refused before reading"):
        read_bytes(str(big), 0, geometry.max_file_bytes + 1, max_bytes=geometry.max_file_bytes)
    assert len(read_bytes(str(big), 0, 10, max_bytes=geometry.max_file_bytes)) == 10


def test_exif_orientation_is_ignored_by_default_and_applied_on_request():
    image = class_images(0, 1, size=(40, 64), seed=3)[0]  # 40 rows x 64 columns: rotation changes the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", exif=exif)
    data = buf.getvalue()
    plain = Geometry(resize=32, crop=32)
    turned = Geometry(resize=32, crop=32, exif_transpose=True)
    upright = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(image, k=-1))).save(upright, format="PNG")  # clockwise
    assert np.array_equal(decode(data, turned), decode(upright.getvalue(), plain))
    unrotated = io.BytesIO()
    Image.fromarray(image).save(unrotated, format="PNG")
    assert np.array_equal(decode(data, plain), decode(unrotated.getvalue(), plain))


def test_damaged_exif_under_exif_transpose_is_a_bad_image_not_a_crash():
    image = class_images(0, 1, size=(40, 64), seed=3)[0]
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "camera"
    raw = bytearray(exif.tobytes())
    raw[17] = 61  # the Make tag's type becomes an unknown one: PIL fails re-writing the EXIF it transposes
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", exif=bytes(raw))
    assert decode(buf.getvalue(), Geometry(32, 32)).shape == (32, 32, 3)  # EXIF ignored: the pixels are fine
    with pytest.raises(BadImage, match="damaged EXIF metadata .*drop --exif-transpose"):
        decode(buf.getvalue(), Geometry(32, 32, exif_transpose=True))


def _float_tiff(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.float32), "F").save(buf, "TIFF")
    return buf.getvalue()


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiffs_in_unit_range_and_in_levels_decode_to_the_same_grey(scale):
    grey = IMAGE[..., 0].astype(np.float64)
    out = np.asarray(open_image(_float_tiff(grey / 255.0 * scale)))
    assert (out[..., 0] == out[..., 2]).all()
    assert np.abs(out[..., 0].astype(int) - grey).max() == 0  # float32 of k/255 rounds back to k


def test_a_unit_range_float_tiff_that_overshoots_one_a_little_is_not_read_as_black():
    grey = IMAGE[..., 0] / 255.0
    overshoot = grey * 1.002  # resampling ringing: the brightest pixels land just above 1.0
    out = np.asarray(open_image(_float_tiff(overshoot)))[..., 0].astype(int)
    assert np.abs(out - IMAGE[..., 0]).max() <= 1  # scaled as [0, 1], the excess clipped at 255


def test_a_float_tiff_holding_nan_is_refused_with_its_reason():
    values = IMAGE[..., 0] / 255.0
    values[3, 4] = np.nan
    with pytest.raises(BadImage, match="NaN or infinite"):
        open_image(_float_tiff(values))
