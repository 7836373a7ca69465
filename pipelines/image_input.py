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


JPEG_SOI = 0xD8
JPEG_EOI = 0xD9
JPEG_SOS = 0xDA
JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01, JPEG_SOI}  # RSTn, TEM: no length field


def is_truncated_jpeg(data: bytes) -> bool:
    """A JPEG whose marker structure ends before the end-of-image marker that closes its last
    scan was cut off (OpenCV would silently decode the top part and grey out the rest).

    Judged from the structure alone, without decoding pixels: segments are skipped by their
    length fields (so an EXIF thumbnail's own end marker is never taken for the image's) and
    each scan's entropy-coded data is skipped to the next real marker. Bytes after the end
    marker (a motion photo's video, padding) do not make a complete JPEG truncated, and an
    end marker that happens to sit in the last bytes does not make a cut one complete.
    Only JPEGs are judged: anything else is False.
    """
    if data[:2] != b"\xff\xd8":
        return False
    return jpeg_end_offset(data) is None


def jpeg_end_offset(data: bytes) -> int | None:
    """Offset just past the end-of-image marker that follows the last scan, or None when the
    data ends first. Stray bytes where a marker should start are skipped, as libjpeg does."""
    pos = 2
    scans = 0
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < len(data) - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos < 0 or pos + 1 >= len(data):
            return None
        marker, pos = data[pos + 1], pos + 2
        if marker == JPEG_EOI and scans:
            return pos
        if marker in JPEG_STANDALONE or marker == JPEG_EOI or marker == 0x00:
            continue
        if pos + 2 > len(data):
            return None
        pos += int.from_bytes(data[pos : pos + 2], "big")
        if marker == JPEG_SOS:
            scans += 1
            pos = _end_of_entropy_data(data, pos)


def _end_of_entropy_data(data: bytes, pos: int) -> int:
    """Offset of the first marker after a scan's entropy-coded data (0xFF00 is a stuffed
    data byte and RSTn markers belong to the scan), or len(data) when none follows."""
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos


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
    if image.format == "PNG" and raw[PNG_BIT_DEPTH_OFFSET : PNG_BIT_DEPTH_OFFSET + 1] != b"\x08":
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
