"""ShareGPT4V reader: the caption JSON (+ COCO captions for its COCO images) -> caption rows.

Pure functions on plain Python data (no Ray). As in Long-CLIP (train/sharegpt4v.py), the first
VALIDATION_RECORDS records of the JSON are the "ShareGPT4V-1k" validation set and the rest the
training set; an image's captions are its long caption and that caption's first sentence.
"""

from __future__ import annotations

import re

from pipelines.captions import CaptionRules, caption_row, check_caption, clean_caption
from pipelines.shards import CAPTION_LONG, CAPTION_SHORT
from pipelines.storage import join

VALIDATION_RECORDS = 1000
SPLIT_VALIDATION = "validation"
SPLIT_TRAIN = "train"
COCO_PREFIX = "coco/train2017/"
COCO_CAPTIONS_PER_IMAGE = 5

ORIGIN_LONG = "sharegpt4v"
ORIGIN_FIRST_SENTENCE = "sharegpt4v-first-sentence"
ORIGIN_COCO = "coco"
REJECT_MALFORMED_RECORD = "malformed_record"
REJECT_BAD_PATH = "bad_path"

# Words whose trailing "." never ends a sentence (compared lower-case, without the dot).
ABBREVIATIONS = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "sr", "jr", "mt", "vs", "e.g", "i.e", "approx", "fig", "inc", "ltd", "co"}
)
# A candidate sentence end: ".", "!" or "?" (closing quotes/brackets may follow), then
# whitespace, then the next sentence's first character: a capital, a digit or an opening quote.
_SENTENCE_END = re.compile(r"""([.!?])['")\]]*\s+(?=[A-Z0-9"'(\[])""")
_LAST_WORD = re.compile(r"(\S+)$")


def first_sentence(text: str) -> str:
    """The caption's first sentence, terminal punctuation kept; the whole (cleaned) text when
    no sentence end is found.

    A sentence ends at ".", "!" or "?" followed by whitespace and a capital letter, digit or
    opening quote, unless the "." ends an abbreviation (ABBREVIATIONS) or a one-letter initial
    ("J. Smith"). So "e.g. a dog" and "3.5 m" never split. Long-CLIP cuts at the first ". ";
    this refines it for abbreviations and lower-case continuations.
    """
    text = clean_caption(text)
    for match in _SENTENCE_END.finditer(text):
        if match.group(1) == "." and ends_with_abbreviation(text[: match.start(1)]):
            continue
        return text[: match.end(0)].rstrip()
    return text


def ends_with_abbreviation(head: str) -> bool:
    word = _LAST_WORD.search(head)
    token = word.group(1).lstrip("(\"'").lower() if word else ""
    return token in ABBREVIATIONS or (len(token) == 1 and token.isalpha())


def coco_captions_by_file(data: dict, max_captions: int = COCO_CAPTIONS_PER_IMAGE) -> dict[str, list[str]]:
    """file_name -> the image's first `max_captions` captions in annotation order, from a COCO
    captions_*.json object; ValueError when an annotation names an unknown image."""
    files = {image["id"]: image["file_name"] for image in data["images"]}
    captions: dict[str, list[str]] = {name: [] for name in files.values()}
    for annotation in data["annotations"]:
        if annotation["image_id"] not in files:
            raise ValueError(f"COCO annotation {annotation.get('id')} names unknown image {annotation['image_id']}")
        texts = captions[files[annotation["image_id"]]]
        if len(texts) < max_captions:
            texts.append(annotation["caption"])
    return captions


def split_of_record(index: int, n_val: int = VALIDATION_RECORDS) -> str:
    """SPLIT_VALIDATION for the first n_val records of the JSON (ShareGPT4V-1k), else SPLIT_TRAIN.

    Indices count every record in file order, malformed ones included, as Long-CLIP's [0:1000].
    """
    if index < 0 or n_val < 0:
        raise ValueError(f"record index and n_val must be >= 0, got {index}, {n_val}")
    return SPLIT_VALIDATION if index < n_val else SPLIT_TRAIN


def split_validation(n_records: int, n_val: int = VALIDATION_RECORDS) -> tuple[range, range]:
    """(validation indices, training indices) of a JSON with n_records records."""
    if not 0 <= n_val <= n_records:
        raise ValueError(f"the validation split needs {n_val} records, the JSON has {n_records}")
    return range(n_val), range(n_val, n_records)


def image_path_reason(image) -> str:
    """Why a record's relative image path cannot be used ("" when it can)."""
    if not isinstance(image, str) or not image.strip():
        return REJECT_MALFORMED_RECORD
    parts = image.replace("\\", "/").split("/")
    if image.startswith(("/", "\\")) or "://" in image or ":" in parts[0] or ".." in parts:
        return REJECT_BAD_PATH
    return ""


def gpt_reply(record: dict):
    """The first "gpt" turn's value, or None when the record has none."""
    turns = record.get("conversations")
    if not isinstance(turns, list):
        return None
    return next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)


def sharegpt4v_caption_rows(record, image_root: str, coco: dict | None, rules: CaptionRules) -> list[dict]:
    """Caption rows of one ShareGPT4V record; its source is image_root joined with its image.

    Rows: the long caption, its first sentence when that differs, and for COCO images the COCO
    captions in `coco` (coco_captions_by_file). A record without a usable image path or gpt
    reply gives one rejected row; so does an empty or too long long caption.
    """
    if not isinstance(record, dict):
        return [rejected_row("", REJECT_MALFORMED_RECORD)]
    image = record.get("image")
    reply = gpt_reply(record)
    path_reason = image_path_reason(image)
    source = "" if path_reason else join(image_root, image)
    reason = path_reason or ("" if isinstance(reply, str) else REJECT_MALFORMED_RECORD)
    if reason:
        return [rejected_row(source, reason)]
    return long_caption_rows(source, reply, rules) + coco_rows(source, image, coco, rules)


def rejected_row(source: str, reason: str) -> dict:
    return caption_row(source, "", kind=CAPTION_LONG, origin=ORIGIN_LONG, reason=reason)


def long_caption_rows(source: str, reply: str, rules: CaptionRules) -> list[dict]:
    caption, reason = check_caption(reply, rules)
    rows = [caption_row(source, caption, kind=CAPTION_LONG, origin=ORIGIN_LONG, reason=reason)]
    short = first_sentence(caption) if caption else ""
    if short and short != caption:
        rows.append(caption_row(source, short, kind=CAPTION_SHORT, origin=ORIGIN_FIRST_SENTENCE))
    return rows


def coco_rows(source: str, image: str, coco: dict | None, rules: CaptionRules) -> list[dict]:
    """COCO captions of a coco/train2017/ image; none for other images or one COCO lacks."""
    if coco is None or not image.startswith(COCO_PREFIX):
        return []
    rows = []
    for text in coco.get(image[len(COCO_PREFIX) :], []):
        caption, reason = check_caption(text, rules)
        rows.append(caption_row(source, caption, kind=CAPTION_SHORT, origin=ORIGIN_COCO, reason=reason))
    return rows
