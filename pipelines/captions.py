"""Caption rows and caption-multiplicity groups: parsing the CC12M TSV and merging rows per image.

Pure functions on plain Python data, so the Ray Data job and the tests share them.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from pipelines.shards import CAPTION_LONG, CAPTION_SHORT

HEADER_FIELDS = ("url", "caption")
URL_SCHEMES = ("http://", "https://")
_WHITESPACE = re.compile(r"\s+")

# Reasons a row is rejected (counted in the manifest, never fatal).
REJECT_MALFORMED = "malformed_row"
REJECT_BAD_URL = "bad_url"
REJECT_EMPTY_CAPTION = "empty_caption"
REJECT_LONG_CAPTION = "caption_too_long"
HEADER = "header"


@dataclass(frozen=True)
class CaptionRules:
    """Parameters that change which captions a build keeps (they enter the build id)."""
    max_caption_chars: int = 4000
    long_caption_min_words: int = 20


def parse_tsv_line(line: str, rules: CaptionRules) -> tuple[str, str, str]:
    """(url, caption, reject_reason) of one TSV line; reason is "" for a kept row."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) != 2:
        return "", "", REJECT_MALFORMED
    url, caption = fields[0].strip(), clean_caption(fields[1])
    if (url.lower(), caption.lower()) == HEADER_FIELDS:
        return "", "", HEADER
    if not url.lower().startswith(URL_SCHEMES):
        return "", "", REJECT_BAD_URL
    if not caption:
        return url, "", REJECT_EMPTY_CAPTION
    if len(caption) > rules.max_caption_chars:
        return url, "", REJECT_LONG_CAPTION
    return url, caption, ""


def clean_caption(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def caption_kind(caption: str, rules: CaptionRules) -> str:
    """CC12M has no caption kinds: a caption of many words counts as a long one."""
    return CAPTION_LONG if len(caption.split()) >= rules.long_caption_min_words else CAPTION_SHORT


def sample_key(source: str) -> str:
    """Stable sample key from the image's source reference (same URL, same key)."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:24]


def group_captions(urls: list[str], captions: list[str], rules: CaptionRules,
                   source_name: str = "cc12m") -> list[dict]:
    """Merge rows by image URL into caption-multiplicity groups (first-seen caption order).

    Identical captions of one image are kept once. Groups come out sorted by key.
    """
    merged: dict[str, list[str]] = {}
    for url, caption in zip(urls, captions):
        texts = merged.setdefault(url, [])
        if caption not in texts:
            texts.append(caption)
    groups = [{"key": sample_key(url), "url": url,
               "captions": [{"text": t, "source": source_name, "kind": caption_kind(t, rules)}
                            for t in texts]}
              for url, texts in merged.items()]
    return sorted(groups, key=lambda g: g["key"])
