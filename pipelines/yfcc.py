"""YFCC15M reader: the YFCC100M metadata TSV, OpenAI's subset list and joined tables -> caption rows.

Pure functions on plain Python data (no Ray); pipelines/build.py maps them over its datasets.
A normalized record is {photo_id, url, title, description, is_video, reason} with the title and
description still raw (URL-encoded as published); yfcc_caption_rows cleans them.
"""

from __future__ import annotations

import html
import math
import re
from urllib.parse import unquote_plus

from pipelines.captions import (
    REJECT_BAD_URL,
    REJECT_MALFORMED,
    CaptionRules,
    caption_row,
    check_caption,
    clean_caption,
    is_http_url,
)

# Column positions in the published 23-column metadata file (yfcc100m_dataset); the
# 25-column variant prepends a line number and puts the photo hash third (after the id).
N_COLUMNS = 23
N_COLUMNS_WITH_HASH = 25
COL_ID = 0
COL_TITLE = 6
COL_DESCRIPTION = 7
COL_DOWNLOAD_URL = 14
COL_MARKER = 22
VIDEO_MARKER = "1"
NO_PHOTO_ID = -1  # photo_id of a malformed line

# Normalized record fields.
REC_PHOTO_ID = "photo_id"
REC_URL = "url"
REC_TITLE = "title"
REC_DESCRIPTION = "description"
REC_IS_VIDEO = "is_video"
REC_REASON = "reason"
# Column names a joined table may use for the photo/video marker (first present wins).
JOINED_MARKER_COLUMNS = ("marker", "photo_video_marker", "is_video", "video")

ORIGIN_TITLE = "yfcc-title"
ORIGIN_DESCRIPTION = "yfcc-description"
REJECT_VIDEO = "video"
REJECT_CAMERA_TITLE = "camera_default_title"
REJECT_DUPLICATE = "duplicate_caption"

# File names cameras and phones give photos, which uploaders often leave as the title:
#   IMG_1234 IMG-1234 IMG1234 IMG_20120512_123456 (Canon, Apple, Android)
#   DSC01234 DSC_1234 DSCN1234 DSCF1234 (Sony, Nikon, Nikon Coolpix, Fujifilm)
#   P1010001 (Olympus, Panasonic: P + 7 digits)   PICT0001 (Minolta, Sanyo)
#   CIMG1234 (Casio)   DCP_1234 DCP01234 (Kodak)   100_1234 (Kodak: folder_number)
#   SAM_1234 (Samsung)   GOPR1234 (GoPro)   20120512_123456 (Android date_time)
# Each with an optional file extension (.JPG, .jpeg, .png ...); matched case-insensitively.
CAMERA_DEFAULT_TITLE = re.compile(
    r"(?:img[_-]?\d+(?:_\d+)?|dsc[nf_]?\d+|p\d{7}|pict\d+|cimg\d+|dcp_?\d+|\d{3}_\d{4}"
    r"|sam_\d+|gopr\d+|\d{8}_\d{6})(?:\.[a-z0-9]{2,4})?",
    re.IGNORECASE,
)
# An HTML tag starts with a letter (or "/letter", "!"): "1 < 2 and 3 > 2" keeps its text.
_HTML_TAG = re.compile(r"<!--.*?-->|<[/!]?[A-Za-z][^<>]*>", re.DOTALL)


def decode_metadata_lines(data: bytes) -> list[str]:
    """Non-empty lines of a metadata or subset file; bytes that are not UTF-8 become U+FFFD."""
    text = data.decode("utf-8", errors="replace")
    return [line for line in text.splitlines() if line.strip()]


def parse_metadata_line(line: str) -> dict:
    """The normalized record of one YFCC100M metadata line (23 or 25 columns)."""
    fields = line.rstrip("\r\n").split("\t")
    if len(fields) == N_COLUMNS_WITH_HASH:
        fields = [fields[1], *fields[3:]]  # drop the line number and the hash
    photo_id = parse_photo_id(fields[COL_ID]) if len(fields) == N_COLUMNS else None
    if photo_id is None:
        return malformed_record()
    return normalized_record(
        photo_id,
        fields[COL_DOWNLOAD_URL],
        fields[COL_TITLE],
        fields[COL_DESCRIPTION],
        fields[COL_MARKER].strip() == VIDEO_MARKER,
    )


def parse_subset_line(line: str) -> int | None:
    """Photo id of a line of OpenAI's yfcc100m_subset_data.tsv (line number, photo id, hash).

    None for the header line or a malformed line.
    """
    fields = line.rstrip("\r\n").split("\t")
    return parse_photo_id(fields[1]) if len(fields) == 3 else None


def joined_record(row: dict) -> dict:
    """The normalized record of one row of a joined table (CSV or Parquet) with columns id,
    url, title, description and optionally a photo/video marker column."""
    photo_id = parse_photo_id(row.get("id"))
    if photo_id is None:
        return malformed_record()
    marker = next((row[c] for c in JOINED_MARKER_COLUMNS if c in row), None)
    return normalized_record(
        photo_id,
        text_field(row.get("url")),
        text_field(row.get("title")),
        text_field(row.get("description")),
        is_video_marker(marker),
    )


def normalized_record(photo_id: int, url: str, title: str, description: str, is_video: bool) -> dict:
    return {
        REC_PHOTO_ID: photo_id,
        REC_URL: url.strip(),
        REC_TITLE: title,
        REC_DESCRIPTION: description,
        REC_IS_VIDEO: is_video,
        REC_REASON: "",
    }


def malformed_record() -> dict:
    return {
        REC_PHOTO_ID: NO_PHOTO_ID,
        REC_URL: "",
        REC_TITLE: "",
        REC_DESCRIPTION: "",
        REC_IS_VIDEO: False,
        REC_REASON: REJECT_MALFORMED,
    }


def parse_photo_id(value) -> int | None:
    """A non-negative integer id from an int, an integral float or a decimal string."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() and value >= 0 else None
    text = str(value).strip()
    return int(text) if text.isascii() and text.isdigit() else None


def is_video_marker(value) -> bool:
    """True for a marker 1 / "1" / True; a missing marker (None, NaN) means a photo."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() in ("1", "1.0", "true")


def text_field(value) -> str:
    """A table cell as text: missing cells (None, NaN from pandas) are empty."""
    return value if isinstance(value, str) else ""


def clean_yfcc_text(raw: str) -> str:
    """Readable text of a published title or description.

    URL decoding (`+` as space, percent escapes; invalid escapes stay, invalid UTF-8 becomes
    U+FFFD) runs once: it is the file's transport encoding, and its output may rightly hold
    "+" or "%" ("C++", "100%"). HTML then repeats until stable, since Flickr text is often
    escaped twice ("&amp;quot;"): entities unescaped, tags replaced by a space. Last, the
    cleaning every corpus shares (captions.clean_caption: invisible characters, NFC,
    whitespace).
    """
    text = unquote_plus(raw)
    while True:
        stripped = _HTML_TAG.sub(" ", html.unescape(text))
        if stripped == text:
            return clean_caption(text)
        text = stripped


def is_camera_default_title(text: str) -> bool:
    """Whether a (cleaned) title is only a camera's file name (see CAMERA_DEFAULT_TITLE)."""
    return CAMERA_DEFAULT_TITLE.fullmatch(text.strip()) is not None


def yfcc_caption_rows(record: dict, rules: CaptionRules) -> list[dict]:
    """Caption rows of one normalized record: one row per caption field (title, description),
    kept or with its reject reason; a malformed record, a video or a bad URL gives one row.

    A description identical to the title is rejected as a duplicate, so the text is kept once.
    """
    url = record[REC_URL]
    reason = record_reason(record)
    if reason:
        return [caption_row(url, "", origin=ORIGIN_TITLE, reason=reason)]
    title, title_reason = check_title(record[REC_TITLE], rules)
    description, description_reason = check_caption(clean_yfcc_text(record[REC_DESCRIPTION]), rules)
    if description and description == title:
        description_reason = REJECT_DUPLICATE
    return [
        caption_row(url, title, origin=ORIGIN_TITLE, reason=title_reason),
        caption_row(url, description, origin=ORIGIN_DESCRIPTION, reason=description_reason),
    ]


def record_reason(record: dict) -> str:
    """Why a whole record yields no caption ("" when its fields are worth reading)."""
    if record[REC_REASON]:
        return record[REC_REASON]
    if record[REC_IS_VIDEO]:
        return REJECT_VIDEO
    return "" if is_http_url(record[REC_URL]) else REJECT_BAD_URL


def check_title(raw: str, rules: CaptionRules) -> tuple[str, str]:
    title, reason = check_caption(clean_yfcc_text(raw), rules)
    if not reason and is_camera_default_title(title):
        return "", REJECT_CAMERA_TITLE
    return title, reason
