"""Decoding arbitrary image files into fixed-size RGB arrays: mode conversion, bomb refusal, geometry.

The format is found from the content, never from the file name (ImageNet has PNGs and a CMYK JPEG or
two named ``.JPEG``). Every failure is a ``BadImage`` carrying a short reason, so the pipeline can record
it and move on, or stop on it under ``--strict``.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# A truncated file must fail, not decode into a grey bottom half (PIL's opt-in leniency stays off).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Refuse images declaring more pixels than this: 89.5 MP is PIL's own warning threshold (a 1 GB RGBA
# bitmap); the largest ImageNet image is ~ 20 MP, so nothing genuine comes near it.
MAX_PIXELS = 89_478_485

# Refuse images whose longer side exceeds this many times the shorter one. The centre crop of such an
# image keeps under 1/20 of it (a 1x5000 strip becomes one source pixel blown up to 224x224), and the
# shorter-side resize would allocate resize x (resize * aspect) pixels: a 1x300000 PNG (a few KB on disk)
# asks for 256 x 76.8M pixels = 59 GB. With the rule, that intermediate is at most resize^2 * 20 pixels.
# ImageNet's most elongated images are about 1:8.
MAX_ASPECT = 20

# Bytes per pixel of the largest raw encoding PIL reads (16-bit RGBA: 8), plus room for metadata (EXIF,
# ICC profiles, text chunks): an image file larger than this cannot hold an image within max_pixels.
RAW_BYTES_PER_PIXEL = 8
METADATA_SLACK = 16 << 20


class BadImage(Exception):
    """An input file that cannot become an image; ``str(exc)`` is the reason recorded in the manifest."""


@dataclass(frozen=True)
class Geometry:
    """Resize the shorter side to ``resize`` (antialiased), then center-crop ``crop`` x ``crop``.

    The torchvision ``Resize(resize)`` + ``CenterCrop(crop)`` convention, with PIL's bilinear filter (PIL
    widens the filter support by the scale factor when shrinking, which is what antialiasing means here).
    """

    resize: int = 256
    crop: int = 224
    max_pixels: int = MAX_PIXELS
    max_aspect: float = MAX_ASPECT
    # Camera photos store "rotate me" in EXIF instead of rotating pixels. Ignored by default, like
    # torchvision's ImageFolder (so shards match what ImageNet-trained models saw); --exif-transpose applies it.
    exif_transpose: bool = False

    def __post_init__(self):
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"--resize {self.resize} / --crop {self.crop}: need resize >= crop >= 1 (the crop is "
                             "taken from the resized image)")
        if self.max_pixels < 1 or self.max_aspect < 1:
            raise ValueError(f"--max-pixels {self.max_pixels} / max_aspect {self.max_aspect}: both must be >= 1")

    @property
    def max_file_bytes(self) -> int:
        """Largest image file worth reading: anything bigger declares more than ``max_pixels`` or is padding."""
        return self.max_pixels * RAW_BYTES_PER_PIXEL + METADATA_SLACK

    def refusal(self, width: int, height: int) -> str | None:
        """Why an image of this declared size is refused before decoding, or None.

        What decoding may allocate is then bounded by ``max_pixels`` (times the bytes per pixel of its
        mode) and what the geometry allocates by ``resize^2 * max_aspect`` pixels.
        """
        if width < 1 or height < 1:
            return f"declares an empty image ({width}x{height})"
        if width * height > self.max_pixels:
            return (f"decompression bomb refused: declares {width}x{height} = {width * height:,} pixels > limit "
                    f"{self.max_pixels:,} (--max-pixels)")
        if max(width, height) > self.max_aspect * min(width, height):
            return (f"aspect ratio refused: {width}x{height} is more than {self.max_aspect:g}:1 (the centre crop "
                    "would keep under 1/{:g} of the image)".format(self.max_aspect))
        return None

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """Output (width, height) of the shorter-side resize; torchvision truncates the longer side."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the centred crop, rounded as torchvision's CenterCrop."""
        top = int(round((height - self.crop) / 2.0))
        left = int(round((width - self.crop) / 2.0))
        return left, top, left + self.crop, top + self.crop


def _flatten_alpha(im: Image.Image) -> Image.Image:
    # Composite on white rather than drop alpha: the colour under fully transparent pixels is arbitrary
    # (often black or garbage), while white is what a viewer shows and what the image's author saw.
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _from_wide_gray(im: Image.Image) -> Image.Image:
    # 16/32-bit integer and float greyscale: PIL's convert("L") clips instead of scaling; scale the range.
    a = np.asarray(im, dtype=np.float64)
    if not np.isfinite(a).all():
        raise BadImage(f"float image ({im.mode}) holds NaN or infinite pixels; no grey level stands for them")
    hi = _white_level(im.mode, a.max())
    return Image.fromarray(np.clip(np.round(a * 255.0 / hi), 0, 255).astype(np.uint8)).convert("RGB")


def _white_level(mode: str, top: float) -> float:
    # A float image (TIFF mode F) whose pixels lie in [0, 1] follows the float convention (1.0 is white); read
    # as 0..255 it would decode near black. Up to 1.5 still counts (resampling overshoots 1.0 a little; the
    # excess clips): levels 0..255 topping out at 1.5 would be black either way. Wider ones are 8- or 16-bit
    # levels stored as floats.
    if mode.startswith("I;16") or top > 255:
        return 65535.0
    return 1.0 if mode == "F" and top <= UNIT_RANGE_TOP else 255.0


UNIT_RANGE_TOP = 1.5


def _palette(im: Image.Image) -> Image.Image:
    return _flatten_alpha(im) if "transparency" in im.info else im.convert("RGB")


# How each PIL mode becomes RGB; anything else goes through PIL's generic convert.
TO_RGB = {
    "RGB": lambda im: im,
    "RGBA": _flatten_alpha, "LA": _flatten_alpha, "PA": _flatten_alpha, "RGBa": _flatten_alpha,
    "P": _palette,
    "I": _from_wide_gray, "I;16": _from_wide_gray, "I;16B": _from_wide_gray, "I;16L": _from_wide_gray,
    "F": _from_wide_gray,
}


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB version of a decoded image of any mode (CMYK, L, 1, P, RGBA, 16-bit, ...)."""
    convert = TO_RGB.get(im.mode)
    if convert is not None:
        return convert(im)
    if "transparency" in im.info:
        return _flatten_alpha(im)
    return im.convert("RGB")


def _pil_allows(max_pixels: int) -> None:
    """Raise PIL's own bomb check (a process-wide global, default ~89.5 M pixels) to at least ``max_pixels``.

    Left at its default it refused every image over 89.5 M pixels whatever --max-pixels allowed. It is only
    ever raised, never lowered or turned off, so threads decoding at once cannot leave it disabled; each
    call's own limit is ours, checked on the declared size right after open.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels


def open_image(data: bytes, max_pixels: int = MAX_PIXELS, geometry: Geometry | None = None) -> Image.Image:
    """Decode ``data`` (any PIL format, detected from content) to a loaded RGB image, or raise BadImage.

    With a ``geometry``, its size rules (pixels, aspect ratio) apply; else only ``max_pixels``.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    rules = geometry or Geometry(1, 1, max_pixels=max_pixels, max_aspect=float("inf"))
    try:
        _pil_allows(rules.max_pixels)
        with warnings.catch_warnings():
            # ours, which names the size and the option, is the check at open; PIL's guards the load
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            # check the declared size before decoding a single pixel: that is the point of the refusal
            reason = rules.refusal(*im.size)
            if reason:
                raise BadImage(reason)
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused: {exc} (--max-pixels {rules.max_pixels:,})") from None
    except UnidentifiedImageError:
        raise BadImage(f"not an image PIL can identify (starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise BadImage(f"corrupt or truncated image ({type(exc).__name__}: {exc})") from None


def transform(im: Image.Image, geometry: Geometry) -> np.ndarray:
    """Shorter-side resize (antialiased bilinear) then center crop; uint8 [crop, crop, 3]."""
    size = geometry.resized_size(*im.size)
    if size != im.size:
        im = im.resize(size, Image.BILINEAR)
    return np.asarray(im.crop(geometry.crop_box(*im.size)), dtype=np.uint8)


def decode(data: bytes, geometry: Geometry) -> np.ndarray:
    """File bytes -> uint8 RGB [crop, crop, 3]; raises BadImage with the reason on any bad input.

    Not ``resize(box=...)`` straight to the crop, although it would allocate less: it rounds its filter
    coefficients differently and changed the bytes of 154 of 300 random test images. The aspect-ratio
    rule bounds the full resize instead.
    """
    im = open_image(data, geometry=geometry)
    if geometry.exif_transpose:
        try:
            im = ImageOps.exif_transpose(im)
        except Exception as exc:  # it parses and re-writes every EXIF tag: a damaged one fails in many ways
            raise BadImage(f"damaged EXIF metadata ({type(exc).__name__}: {exc}); --exif-transpose cannot apply its "
                           "orientation (drop --exif-transpose to ignore EXIF, as torchvision does)") from None
    try:
        return transform(im, geometry)
    except MemoryError:  # a safety net: the size rules should make this unreachable
        raise BadImage(f"out of memory resizing a {im.size[0]}x{im.size[1]} image; lower --max-pixels") from None
