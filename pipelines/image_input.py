"""Source image bytes -> bytes img2dataset's resizer handles correctly, or a reject reason.

img2dataset's Resizer decodes with OpenCV's IMREAD_UNCHANGED: it ignores EXIF orientation,
keeps 16-bit samples, decodes a decompression bomb before checking its area and reads a
truncated JPEG as a grey-bottomed picture. So every image is first inspected from its header
(Pillow, no pixel decode): plain 8-bit RGB/grey JPEGs and PNGs without rotation (the bulk of
every corpus) pass through untouched; anything else (CMYK, palette, alpha, 16-bit, float,
EXIF-rotated) is decoded once by Pillow, turned upright, converted to 8-bit RGB (alpha
composited on white, as img2dataset does) and handed on as a lossless PNG.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PASS_THROUGH_FORMATS = ("JPEG", "PNG")
PASS_THROUGH_MODES = ("RGB",)
PNG_BIT_DEPTH_OFFSET = 24  # IHDR: Pillow reports 16-bit RGB PNGs as "RGB"; OpenCV keeps 16 bits
EXIF_ORIENTATION = 0x0112

REJECT_EMPTY = "empty_file"
REJECT_NOT_IMAGE = "not_an_image"
REJECT_BOMB = "decompression_bomb"
REJECT_TRUNCATED = "truncated_image"
REJECT_DECODE = "decode_error"
REJECT_TOO_SMALL = "image_too_small"


def is_truncated_jpeg(data: bytes) -> bool:
    """A JPEG without its end-of-image marker near the end was cut off (OpenCV would
    silently decode the top part and grey out the rest)."""
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]


def prepare_source_image(raw: bytes, max_pixels: int, min_side: int = 0) -> tuple[bytes | None, str]:
    """(bytes for the resizer, "") or (None, reason)."""
    if not raw:
        return None, REJECT_EMPTY
    if is_truncated_jpeg(raw):
        return None, REJECT_TRUNCATED
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None, REJECT_BOMB
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None, REJECT_NOT_IMAGE
    width, height = image.size
    if width * height > max_pixels:
        return None, REJECT_BOMB
    if min(width, height) < min_side:
        return None, REJECT_TOO_SMALL
    if _passes_through(image, raw):
        return raw, ""
    return _normalised_png(image)


def _passes_through(image: Image.Image, raw: bytes) -> bool:
    if image.format not in PASS_THROUGH_FORMATS or image.mode not in PASS_THROUGH_MODES:
        return False
    if image.format == "PNG" and raw[PNG_BIT_DEPTH_OFFSET:PNG_BIT_DEPTH_OFFSET + 1] != b"\x08":
        return False
    return image.getexif().get(EXIF_ORIENTATION, 1) == 1


def _normalised_png(image: Image.Image) -> tuple[bytes | None, str]:
    try:
        image.load()
        rgb = to_rgb8(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError) as error:
        truncated = "truncated" in str(error).lower()
        return None, REJECT_TRUNCATED if truncated else REJECT_DECODE
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=1)
    return out.getvalue(), ""


def to_rgb8(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB: transparency over white, high bit depths scaled down."""
    if image.mode.startswith("I;16"):
        return Image.fromarray(_to_u8(np.asarray(image), 65535), mode="L").convert("RGB")
    if image.mode in ("I", "F"):
        return Image.fromarray(_to_u8(np.asarray(image)), mode="L").convert("RGB")
    if image.mode == "RGB" and image.format == "PNG":  # 16 bits per channel: Pillow keeps 8
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _to_u8(values: np.ndarray, top: float | None = None) -> np.ndarray:
    """Wide integer or float samples to 8 bits by their nominal range (`top`, else guessed:
    floats in [0, 1], integers above 255 as 16-bit)."""
    if top is None and values.dtype.kind == "f":
        top = 1.0 if values.max(initial=0) <= 1.0 else 255.0
    elif top is None:
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
