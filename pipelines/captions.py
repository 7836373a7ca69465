"""Caption rows and caption-multiplicity groups: parsing the CC12M TSV and merging rows per image.

Pure functions on plain Python data, so the Ray Data job and the tests share them.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from pipelines.shards import CAPTION_LONG, CAPTION_SHORT

HEADER_FIELDS = ("url", "caption")
URL_SCHEMES = ("http://", "https://")
_WHITESPACE = re.compile(r"\s+")

# Reasons a row is rejected (counted in the manifest, never fatal).
REJECT_MALFORMED = "malformed_row"
REJECT_BAD_URL = "bad_url"
REJECT_EMPTY_CAPTION = "empty_caption"
REJECT_LONG_CAPTION = "caption_too_long"
REJECT_NON_UTF8 = "non_utf8_row"
REJECT_NON_UTF8_CAPTION = "non_utf8_caption"  # holds U+FFFD: bytes were not UTF-8 upstream
HEADER = "header"
# Text inputs are read as Latin-1 (every byte is one character, nothing fails to decode),
# then each line is decoded as UTF-8 on its own: one bad line is a counted reject, not a
# failed job.
READ_ENCODING = "latin-1"

# Fields of a caption row, the unit every corpus reader hands to pipelines/build.py:
# rows that share a source form one caption group (one image sample).
ROW_SOURCE = "source"  # image URL (http/https) or storage path/URI of the image file
ROW_CAPTION = "caption"  # cleaned caption text; "" when rejected
ROW_KIND = "kind"  # CAPTION_SHORT, CAPTION_LONG or "" (inferred from the word count)
ROW_ORIGIN = "origin"  # where the caption comes from, e.g. "yfcc-title", "coco"
ROW_REASON = "reason"  # "" for a kept row, else a reject reason counted in the manifest


@dataclass(frozen=True)
class CaptionRules:
    """Parameters that change which captions a build keeps (they enter the build id)."""

    max_caption_chars: int = 4000
    long_caption_min_words: int = 20


def redecode_utf8(line: str) -> str | None:
    """A line read as Latin-1, decoded as UTF-8 (None when it is not valid UTF-8)."""
    try:
        return line.encode(READ_ENCODING).decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return None


def parse_tsv_line(line: str, rules: CaptionRules) -> tuple[str, str, str]:
    """(url, caption, reject_reason) of one TSV line; reason is "" for a kept row."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 2:
        return "", "", REJECT_MALFORMED
    url = fields[0].strip()
    if url.lower() == HEADER_FIELDS[0] and clean_caption(fields[1]).lower() == HEADER_FIELDS[1]:
        return "", "", HEADER
    if not is_http_url(url):
        return "", "", REJECT_BAD_URL
    caption, reason = check_caption(fields[1], rules)
    return url, caption, reason


def clean_caption(text: str) -> str:
    """The one caption normalisation every corpus reader applies (CC12M, YFCC, ShareGPT4V).

    1. HTML entities unescaped once (`&amp;` -> `&`, `&#39;` -> `'`): web captions carry them.
    2. Invisible characters removed: control characters (Unicode category Cc) other than
       whitespace, and format characters (Cf: zero-width space U+200B, word joiner U+2060,
       byte-order mark U+FEFF, soft hyphen, direction marks) -- except the zero-width
       non-joiner and joiner U+200C / U+200D, which Persian, Indic scripts and emoji
       sequences need, and the tag characters U+E0020-U+E007F of emoji subdivision flags.
    3. Unicode NFC, so one text has one code-point sequence (what the tokeniser and the
       caption dedup compare).
    4. Whitespace runs (tabs, newlines, NBSP and other Unicode spaces) collapsed to one
       space, ends stripped.
    """
    text = _INVISIBLE.sub("", html.unescape(text))
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    return _WHITESPACE.sub(" ", text).strip()


# The Unicode planes that hold Cc/Cf code points (BMP, SMP, SSP): scanning only these builds
# the class in a quarter of the time every importing process paid (test_captions checks the
# whole range has none elsewhere).
CONTROL_FORMAT_PLANES = (0, 1, 14)


def _invisible_class() -> re.Pattern:
    """One character class of every Cc/Cf code point that clean_caption removes (built once:
    a regex scans a caption in C, a Python loop over its characters took 15 us a caption)."""

    def removed(ch: str) -> bool:
        if ch.isspace() or ch in "\u200c\u200d" or "\U000e0020" <= ch <= "\U000e007f":
            return False
        return unicodedata.category(ch) in ("Cc", "Cf")

    points = [
        c
        for plane in CONTROL_FORMAT_PLANES
        for c in range(plane << 16, (plane + 1) << 16)
        if not 0xD800 <= c <= 0xDFFF and removed(chr(c))
    ]
    ranges = []
    start = points[0]
    for prev, cur in zip(points, points[1:] + [None]):
        if cur != prev + 1:
            ranges.append(re.escape(chr(start)) + ("" if prev == start else "-" + re.escape(chr(prev))))
            start = cur
    return re.compile("[" + "".join(ranges) + "]+")


_INVISIBLE = _invisible_class()


def is_http_url(url: str) -> bool:
    return url.lower().startswith(URL_SCHEMES)


def check_caption(text: str, rules: CaptionRules) -> tuple[str, str]:
    """(cleaned caption, reject reason): ("", reason) for an empty or too long caption.

    The length limit applies after cleaning, so padding never counts towards it.
    """
    caption = clean_caption(text)
    if not caption:
        return "", REJECT_EMPTY_CAPTION
    if len(caption) > rules.max_caption_chars:
        return "", REJECT_LONG_CAPTION
    if "\ufffd" in caption:
        return "", REJECT_NON_UTF8_CAPTION
    return caption, ""


def caption_row(source: str, caption: str, *, kind: str = "", origin: str, reason: str = "") -> dict:
    """One caption row (see ROW_* above); a rejected row carries no caption text."""
    return {
        ROW_SOURCE: source,
        ROW_CAPTION: "" if reason else caption,
        ROW_KIND: kind,
        ROW_ORIGIN: origin,
        ROW_REASON: reason,
    }


def caption_kind(caption: str, rules: CaptionRules) -> str:
    """CC12M has no caption kinds: a caption of many words counts as a long one."""
    return CAPTION_LONG if len(caption.split()) >= rules.long_caption_min_words else CAPTION_SHORT


def sample_key(source: str) -> str:
    """Stable sample key from the image's source reference (same URL, same key)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def group_captions(rows: list[dict], rules: CaptionRules) -> list[dict]:
    """Merge caption rows (source, caption, kind, origin) by image source into
    caption-multiplicity groups; a caption's kind is inferred from its length when the row
    leaves it empty.

    Identical captions of one image are kept once (the first row seen). Captions come out
    sorted by text and groups by key: the rows of one image reach the grouping stage in an
    order the shuffle does not fix, and shards must be byte-for-byte reproducible.
    """
    merged: dict[str, dict[str, dict]] = {}
    for row in rows:
        texts = merged.setdefault(row["source"], {})
        if row["caption"] not in texts:
            texts[row["caption"]] = {
                "text": row["caption"],
                "source": row["origin"],
                "kind": row["kind"] or caption_kind(row["caption"], rules),
            }
    groups = [
        {"key": sample_key(source), "source": source, "captions": [texts[t] for t in sorted(texts)]}
        for source, texts in merged.items()
    ]
    return sorted(groups, key=lambda g: g["key"])


# Caption rows, the one thing a corpus reader produces.
ROW_COLUMNS = ("source", "caption", "kind", "origin", "reason")


def rows_to_columns(rows: list[dict]) -> dict:
    """Caption-row dicts -> Ray Data's numpy column form. No rows: empty string arrays, not
    object ones, which Arrow would type as null and a later shuffle could not concatenate
    with other blocks (a metadata chunk without one subset photo gives no rows)."""
    dtype = object if rows else str
    return {c: np.array([r.get(c, "") for r in rows], dtype=dtype) for c in ROW_COLUMNS}
