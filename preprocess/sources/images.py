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
from PIL import Image, ImageFile, UnidentifiedImageError

# A truncated file must fail, not decode into a grey bottom half (PIL's opt-in leniency stays off).
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Refuse images declaring more pixels than this: 89.5 MP is PIL's own warning threshold (a 1 GB RGBA
# bitmap); the largest ImageNet image is ~ 20 MP, so nothing genuine comes near it.
MAX_PIXELS = 89_478_485


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

    def __post_init__(self):
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(f"--resize {self.resize} / --crop {self.crop}: need resize >= crop >= 1 (the crop is "
                             "taken from the resized image)")

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
    hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(a * 255.0 / hi), 0, 255).astype(np.uint8)).convert("RGB")


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


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode ``data`` (any PIL format, detected from content) to a loaded RGB image, or raise BadImage."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            # check the declared size before decoding a single pixel: that is the point of the refusal
            if width * height > max_pixels:
                raise BadImage(f"decompression bomb refused: declares {width}x{height} = {width * height:,} "
                               f"pixels > limit {max_pixels:,}")
            im.load()
            return to_rgb(im)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage(f"decompression bomb refused: {exc}") from None
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
    """File bytes -> uint8 RGB [crop, crop, 3]; raises BadImage with the reason on any bad input."""
    return transform(open_image(data, geometry.max_pixels), geometry)
