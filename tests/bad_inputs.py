"""A CC12M-layout corpus mixing valid rows with every kind of bad input the prepare jobs must
count by reason (served by a loopback mirror), and what each must become."""

from __future__ import annotations

import io
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.mirror import STALL_PREFIX, STATUS_PREFIX


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth RGB picture, distinct per seed (survives JPEG without turning into noise)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rng = np.random.default_rng(seed)
    channels = [
        127 + 120 * np.sin(x / rng.uniform(5, 20) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 20))
        for _ in range(3)
    ]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG whose header declares side x side pixels (1.6 G): only a header check is safe."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def exif_rotated_jpeg(seed: int) -> bytes:
    """A 96x64 landscape JPEG whose EXIF orientation (6) says it is a 64x96 portrait."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(scene(96, 64, seed)), "JPEG", quality=92, exif=exif.tobytes())


def good_files(seed: int) -> dict[str, bytes]:
    """Images that must be kept, in every awkward encoding a corpus holds."""
    rgb = Image.fromarray(scene(80, 60, seed))
    rgba = Image.fromarray(np.dstack([scene(64, 64, seed + 1), np.full((64, 64), 128, np.uint8)]))
    grey16 = Image.fromarray((scene(64, 48, seed + 2)[..., 0].astype(np.uint16) * 257))
    return {
        "plain.jpg": encode(rgb, "JPEG", quality=92),
        "cmyk.jpg": encode(Image.fromarray(scene(70, 50, seed + 3)).convert("CMYK"), "JPEG"),
        "palette.png": encode(Image.fromarray(scene(64, 64, seed + 4)).convert("P"), "PNG"),
        "alpha.png": encode(rgba, "PNG"),
        "grey16.png": encode(grey16, "PNG"),
        "grey.jpg": encode(Image.fromarray(scene(64, 64, seed + 5)).convert("L"), "JPEG"),
        "rotated.jpg": exif_rotated_jpeg(seed + 6),
        "webp.webp": encode(Image.fromarray(scene(64, 64, seed + 7)), "WEBP"),
    }


def bad_files(seed: int) -> dict[str, tuple[bytes, str]]:
    """Files that must be skipped, with the reason each is counted under."""
    jpeg = encode(Image.fromarray(scene(90, 90, seed)), "JPEG")
    return {
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated_image"),
        "text.jpg": (b"<html><body>not found</body></html>", "not_an_image"),
        "empty.jpg": (b"", "empty_file"),
        "tiny.png": (encode(Image.fromarray(scene(12, 12, seed)), "PNG"), "image_too_small"),
        "bomb.png": (bomb_png(), "decompression_bomb"),
    }


@dataclass
class BadCorpus:
    tsv: Path
    good: dict[str, set[str]] = field(default_factory=dict)  # URL -> captions kept
    failed: Counter = field(default_factory=Counter)  # image failure reason -> count
    rejected: Counter = field(default_factory=Counter)  # row reject reason -> count
    rotated_url: str = ""


def write_bad_corpus(mirror_root: Path, base_url: str, out: Path, seed: int = 0) -> BadCorpus:
    """Images under mirror_root (served at base_url) and a TSV of rows over them."""
    mirror_root.mkdir(parents=True, exist_ok=True)
    corpus = BadCorpus(out)
    lines: list[bytes] = [b"url\tcaption"]
    for name, data in good_files(seed).items():
        (mirror_root / name).write_bytes(data)
        url = f"{base_url}/{name}"
        corpus.good[url] = {f"a picture called {name}", f"{name} once more"}
        lines += [f"{url}\ta picture called {name}".encode(), f"{url}\t{name} once more".encode()]
    corpus.rotated_url = f"{base_url}/rotated.jpg"
    for name, (data, reason) in bad_files(seed).items():
        (mirror_root / name).write_bytes(data)
        lines.append(f"{base_url}/{name}\tcaption of {name}".encode())
        corpus.failed[reason] += 1
    web_failures = {
        f"{base_url}/missing.jpg": "http_404",
        f"{base_url}{STATUS_PREFIX}500/x.jpg": "http_500",
        f"{base_url}{STATUS_PREFIX}403/x.jpg": "http_403",
        f"{base_url}{STALL_PREFIX}x.jpg": "timeout",
        "http://127.0.0.1:9/refused.jpg": "connection_error",
    }
    for url, reason in web_failures.items():
        lines.append(f"{url}\tcaption of a failure".encode())
        corpus.failed[reason] += 1
    plain = f"{base_url}/plain.jpg"
    row_rejects = [
        (f"{plain}\t".encode(), "empty_caption"),
        (f"{plain}\t   ".encode(), "empty_caption"),
        (f"{plain}\t{'word ' * 2000}".encode(), "caption_too_long"),
        (f"{plain}\tcaf".encode() + b"\xe9 au lait", "non_utf8_row"),
        (f"{plain}\ttoo\tmany\tfields".encode(), "malformed_row"),
        (b"just some text without a tab", "malformed_row"),
        (b"ftp://127.0.0.1/a.jpg\tnot a web url", "bad_url"),
    ]
    for line, reason in row_rejects:
        lines.append(line)
        corpus.rejected[reason] += 1
    out.write_bytes(b"\n".join(lines) + b"\n")
    return corpus
