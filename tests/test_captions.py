"""Caption rows and groups: TSV parsing and rejection reasons, merging rows per image, and the
pure stages and helpers of pipelines/build.py called directly on NumPy batches (no Ray)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from pipelines import build, captions, cc12m  # build and cc12m import ray (Ray is never started here)
from pipelines.captions import (
    HEADER,
    READ_ENCODING,
    REJECT_BAD_URL,
    REJECT_EMPTY_CAPTION,
    REJECT_LONG_CAPTION,
    REJECT_MALFORMED,
    REJECT_NON_UTF8,
    CaptionRules,
    caption_kind,
    group_captions,
    parse_tsv_line,
    sample_key,
)
from pipelines.shards import CAPTION_LONG, CAPTION_SHORT
from pipelines.stages import DownloadParams

RULES = CaptionRules(max_caption_chars=40, long_caption_min_words=5)
URL_A, URL_B, URL_C = (f"https://127.0.0.1/img/{n}.jpg" for n in "abc")

# --- parse_tsv_line ----------------------------------------------------------------------


def test_good_row_is_kept():
    assert parse_tsv_line(f"{URL_A}\ta red circle\n", RULES) == (URL_A, "a red circle", "")
    assert parse_tsv_line(f"{URL_A}\ta red circle\r\n", RULES) == (URL_A, "a red circle", "")
    upper = "HTTP://127.0.0.1/1.jpg"  # scheme case-insensitive, URL padding stripped
    assert parse_tsv_line(f" {upper} \tok", RULES) == (upper, "ok", "")


@pytest.mark.parametrize("line", ["url\tcaption", "URL\tCaption\n", " url \t caption "])
def test_header_row_is_tolerated(line):
    assert parse_tsv_line(line, RULES) == ("", "", HEADER)


@pytest.mark.parametrize("line", [URL_A, f"{URL_A}\tone\ttwo", "", "\n"])
def test_row_without_exactly_two_fields_is_malformed(line):
    assert parse_tsv_line(line, RULES) == ("", "", REJECT_MALFORMED)


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/a.jpg", "/data/a.jpg", "file:///a.jpg", "data:image/png;base64,AAAA", "httpx://a/b.jpg", ""],
)
def test_url_without_http_scheme_is_rejected(url):
    assert parse_tsv_line(f"{url}\ta caption", RULES) == ("", "", REJECT_BAD_URL)


@pytest.mark.parametrize("caption", ["", "   ", "\u00a0\u2003", "\x0b\x0c"])
def test_blank_caption_is_rejected(caption):
    assert parse_tsv_line(f"{URL_A}\t{caption}", RULES) == (URL_A, "", REJECT_EMPTY_CAPTION)


def test_caption_length_limit_applies_after_cleaning():
    at_limit = "x" * RULES.max_caption_chars
    assert parse_tsv_line(f"{URL_A}\t{at_limit}", RULES) == (URL_A, at_limit, "")
    assert parse_tsv_line(f"{URL_A}\t{at_limit}y", RULES) == (URL_A, "", REJECT_LONG_CAPTION)
    # Padding that cleaning removes does not count towards the limit.
    assert parse_tsv_line(f"{URL_A}\t   {at_limit}   ", RULES)[2] == ""


def test_whitespace_runs_collapse_to_one_space():
    line = f"{URL_A}\t  a\u00a0 red \x0b\x0c circle\u2003on   grey  "
    assert parse_tsv_line(line, RULES) == (URL_A, "a red circle on grey", "")


# --- caption_kind and group_captions ---------------------------------------------------


def test_caption_kind_threshold_counts_words():
    n = RULES.long_caption_min_words
    assert caption_kind(" ".join(["w"] * (n - 1)), RULES) == CAPTION_SHORT
    assert caption_kind(" ".join(["w"] * n), RULES) == CAPTION_LONG
    assert caption_kind("  ".join(["w"] * (n - 1)) + "  ", RULES) == CAPTION_SHORT


def rows_of(urls, caps, origin="cc12m", kinds=None) -> list[dict]:
    kinds = kinds or [""] * len(urls)
    return [{"source": u, "caption": c, "kind": k, "origin": origin} for u, c, k in zip(urls, caps, kinds)]


def test_group_captions_merges_rows_of_one_url_anywhere_in_the_input():
    urls = [URL_B, URL_A, URL_C, URL_B, URL_A, URL_B, URL_A]
    caps = ["b one", "a one", "c one", "b two", "a one", "b one", "a two words here and more"]
    groups = group_captions(rows_of(urls, caps, "demo"), RULES)
    assert [g["key"] for g in groups] == sorted(sample_key(u) for u in (URL_A, URL_B, URL_C))
    by_url = {g["source"]: g for g in groups}
    assert all(g["key"] == sample_key(url) for url, g in by_url.items())
    # Sorted by text, exact duplicates of one image kept once.
    assert [c["text"] for c in by_url[URL_A]["captions"]] == ["a one", "a two words here and more"]
    assert [c["text"] for c in by_url[URL_B]["captions"]] == ["b one", "b two"]
    assert [c["text"] for c in by_url[URL_C]["captions"]] == ["c one"]
    assert by_url[URL_A]["captions"] == [
        {"text": "a one", "source": "demo", "kind": CAPTION_SHORT},
        {"text": "a two words here and more", "source": "demo", "kind": CAPTION_LONG},
    ]


def test_a_kind_given_by_the_reader_wins_over_the_word_count():
    rows = rows_of(
        [URL_A, URL_A], ["short words", "many words " * 10], "sharegpt4v", kinds=[CAPTION_LONG, CAPTION_SHORT]
    )
    (group,) = group_captions(rows, RULES)
    assert {c["text"]: c["kind"] for c in group["captions"]} == {
        "short words": CAPTION_LONG,
        "many words " * 10: CAPTION_SHORT,
    }


def test_same_caption_on_two_images_stays_with_each():
    groups = group_captions(rows_of([URL_A, URL_B], ["same words", "same words"]), RULES)
    assert [len(g["captions"]) for g in groups] == [1, 1]


def test_sample_key_is_stable_and_distinct():
    assert sample_key(URL_A) == sample_key(URL_A)
    assert sample_key(URL_A) != sample_key(URL_B)
    assert len(sample_key(URL_A)) == 24 and int(sample_key(URL_A), 16) >= 0


def test_groups_do_not_depend_on_row_order():
    urls = [URL_A, URL_B, URL_A, URL_C]
    caps = ["one", "two", "three", "four"]
    forward = group_captions(rows_of(urls, caps), RULES)
    backward = group_captions(rows_of(urls[::-1], caps[::-1]), RULES)
    assert [g["key"] for g in forward] == [g["key"] for g in backward]
    assert {g["source"]: {c["text"] for c in g["captions"]} for g in forward} == {
        g["source"]: {c["text"] for c in g["captions"]} for g in backward
    }


# --- pure stages of pipelines/build.py --------------------------------------------------


def test_parse_tsv_rows_stage_on_a_numpy_batch():
    lines = [
        "url\tcaption",
        f"{URL_A}\tfirst",
        f"{URL_B}\tsecond",
        "garbage",
        f"{URL_A}\t  third  ",
        "ftp://127.0.0.1/y\tz",
        f"{URL_C}\t",
    ]
    out = cc12m.ParseTsvRows(RULES, "cc12m")({"text": np.array(lines, dtype=object)})
    assert set(out) == set(captions.ROW_COLUMNS)
    assert all(len(column) == len(lines) for column in out.values())
    assert list(out["reason"]) == [HEADER, "", "", REJECT_MALFORMED, "", REJECT_BAD_URL, REJECT_EMPTY_CAPTION]
    assert list(out["caption"][[1, 2, 4]]) == ["first", "second", "third"]
    assert list(out["source"][[1, 2, 4]]) == [URL_A, URL_B, URL_A]
    assert set(out["origin"][[1, 2, 4]]) == {"cc12m"}


def test_non_utf8_lines_are_rejected_alone():
    """Lines arrive decoded as Latin-1 (read_text_lines); one bad byte rejects one line."""
    raw = [f"{URL_A}\tcaf\u00e9 au lait".encode("utf-8"), f"{URL_B}\tcaf\xe9".encode("latin-1")]
    lines = np.array([r.decode(READ_ENCODING) for r in raw], dtype=object)
    out = cc12m.ParseTsvRows(RULES, "cc12m")({"text": lines})
    assert list(out["reason"]) == ["", REJECT_NON_UTF8]
    assert out["caption"][0] == "caf\u00e9 au lait"


def test_rows_of_one_source_share_a_bucket_across_batches():
    urls = np.array([f"http://127.0.0.1/{i}.jpg" for i in range(50)], dtype=object)
    first = build.add_buckets({"source": urls.copy()}, n_buckets=7)["bucket"]
    second = build.add_buckets({"source": urls[::-1].copy()}, n_buckets=7)["bucket"]
    assert first.dtype == np.int64 and ((first >= 0) & (first < 7)).all()
    assert list(first) == list(second[::-1])
    assert len(set(first)) > 1  # buckets actually spread the URLs


def test_group_bucket_stage_matches_group_captions():
    urls = np.array([URL_B, URL_A, URL_B, URL_A], dtype=object)
    caps = np.array(["b1", "a1", "b2", "a1"], dtype=object)
    batch = {
        "source": urls,
        "caption": caps,
        "kind": np.array([""] * 4, dtype=object),
        "origin": np.array(["demo"] * 4, dtype=object),
        "bucket": np.zeros(4),
    }
    out = build.GroupBucket(RULES)(batch)
    groups = [json.loads(g) for g in out["group"]]
    assert groups == group_captions(rows_of(list(urls), list(caps), "demo"), RULES)
    assert list(out["key"]) == [g["key"] for g in groups]


def test_assign_shards_is_deterministic_and_in_range():
    keys = np.array([sample_key(f"http://127.0.0.1/{i}.jpg") for i in range(200)], dtype=object)
    first = build.assign_shards({"key": keys.copy()}, num_shards=5)["shard_id"]
    again = build.assign_shards({"key": keys[::-1].copy()}, num_shards=5)["shard_id"][::-1]
    assert first.dtype == np.int64
    assert np.array_equal(first, again)
    assert set(first.tolist()) == set(range(5))  # 200 keys reach every shard
    assert list(first) == [int(k[:8], 16) % 5 for k in keys]


def test_pack_shard_sorts_groups_by_key():
    groups = [{"key": k, "source": k, "captions": []} for k in ("c1", "a2", "b3")]
    batch = {
        "shard_id": np.array([4, 4, 4]),
        "key": np.array([g["key"] for g in groups], object),
        "group": np.array([json.dumps(g) for g in groups], dtype=object),
    }
    out = build.pack_shard(batch)
    assert out["shard_id"].tolist() == [4]
    assert [g["key"] for g in json.loads(out["groups"][0])] == ["a2", "b3", "c1"]


def test_build_id_ignores_network_settings_but_not_content_settings():
    base = build.BuildParams(corpus="demo", shard_size=10, download=DownloadParams(image_size=64), caption_rules=RULES)
    digests = ["d" * 64]
    same = build.BuildParams(
        corpus="demo",
        shard_size=10,
        caption_rules=RULES,
        download=DownloadParams(image_size=64, timeout_s=1.0, retries=5, thread_count=2),
    )
    assert build.compute_build_id(digests, same) == build.compute_build_id(digests, base)
    assert "timeout_s" not in build.content_params(base)["download"]
    changed = [
        build.BuildParams(corpus="demo", shard_size=10, caption_rules=RULES, download=DownloadParams(image_size=96)),
        build.BuildParams(
            corpus="demo",
            shard_size=10,
            download=DownloadParams(image_size=64),
            caption_rules=CaptionRules(max_caption_chars=41, long_caption_min_words=5),
        ),
        build.BuildParams(corpus="demo", shard_size=11, download=DownloadParams(image_size=64), caption_rules=RULES),
        build.BuildParams(corpus="other", shard_size=10, download=DownloadParams(image_size=64), caption_rules=RULES),
    ]
    ids = {build.compute_build_id(digests, p) for p in changed}
    assert build.compute_build_id(digests, base) not in ids and len(ids) == len(changed)
    assert build.compute_build_id(["e" * 64], base) != build.compute_build_id(digests, base)


def test_assemble_manifest_counts_add_up():
    params = build.BuildParams(corpus="demo", shard_size=2)
    reasons = Counter({"": 9, HEADER: 1, REJECT_BAD_URL: 2, REJECT_MALFORMED: 1})
    shard_stats = {
        1: {"shard": {"id": 1, "n_samples": 1}, "failures": {"http_404": 1}, "n_groups": 3, "n_captions_written": 3},
        0: {
            "shard": {"id": 0, "n_samples": 2},
            "failures": {"decode_error": 1, "http_404": 1},
            "n_groups": 4,
            "n_captions_written": 4,
            "duplicates_merged": 1,
        },
    }
    manifest = build.assemble_manifest("bid", [{"uri": "x.tsv"}], params, reasons, shard_stats)
    counts = manifest["counts"]
    assert counts == {
        "rows_read": 12,
        "header_rows": 1,
        "rows_rejected": {REJECT_BAD_URL: 2, REJECT_MALFORMED: 1},
        "unique_sources": 7,
        "downloaded": 4,
        "failed": {"decode_error": 1, "http_404": 2},
        "written": 3,
        "duplicates_merged": 1,
        "captions_written": 7,
    }
    assert counts["unique_sources"] == (
        counts["written"] + counts["duplicates_merged"] + sum(counts["failed"].values())
    )
    assert [e["id"] for e in manifest["shards"]] == [0, 1]
    assert manifest["params"] == build.content_params(params)
    assert manifest["build_id"] == "bid" and manifest["corpus"] == "demo"


# --- one caption cleaning for every corpus reader -------------------------------------------

# Entities, invisible characters (zero-width space, word joiner, BOM, a BEL control), a
# decomposed "é", Unicode spaces; kept: Persian's zero-width non-joiner, an emoji ZWJ sequence
# and the tag characters of England's flag.
PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
FAMILY = "\U0001f468\u200d\U0001f469"
ENGLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f"
DIRTY = (
    f"Tom &amp; Jerry\u200b at\u2060 the\ufeff  cafe\u0301\x07 &#39;{PERSIAN}&#39;"
    f"\u00a0{FAMILY}\x0b{ENGLAND} AT&T\u2003"
)
CLEAN = f"Tom & Jerry at the caf\u00e9 '{PERSIAN}' {FAMILY} {ENGLAND} AT&T"


def test_clean_caption_unescapes_normalises_and_drops_invisible_characters():
    from pipelines.captions import clean_caption

    assert clean_caption(DIRTY) == CLEAN
    assert clean_caption(CLEAN) == CLEAN  # idempotent
    assert clean_caption("a\u00adb\u200ec\u200fd\x00e") == "abcde"  # soft hyphen, bidi marks, NUL


def test_no_control_or_format_character_lies_outside_the_planes_scanned():
    """The invisible-character class is built from CONTROL_FORMAT_PLANES only: every Cc/Cf
    code point of this Python's Unicode database lies there."""
    import sys
    import unicodedata

    from pipelines.captions import CONTROL_FORMAT_PLANES

    outside = [
        c
        for c in range(sys.maxunicode + 1)
        if c >> 16 not in CONTROL_FORMAT_PLANES and unicodedata.category(chr(c)) in ("Cc", "Cf")
    ]
    assert outside == []


def test_cc12m_reader_cleans_captions():
    assert parse_tsv_line(f"{URL_A}\t{DIRTY}", CaptionRules()) == (URL_A, CLEAN, "")


def test_yfcc_reader_cleans_captions():
    from pipelines import yfcc

    record = yfcc.normalized_record(7, URL_A, DIRTY, f"{DIRTY} <b>again</b>", False)
    rows = yfcc.yfcc_caption_rows(record, CaptionRules())
    assert [r["caption"] for r in rows] == [CLEAN, f"{CLEAN} again"]


def test_sharegpt4v_reader_cleans_captions():
    from pipelines import sharegpt4v

    record = {
        "image": "coco/train2017/x.jpg",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": DIRTY}],
    }
    rows = sharegpt4v.sharegpt4v_caption_rows(record, "/data", {"x.jpg": [f"A {DIRTY}"]}, CaptionRules())
    assert {(r["origin"], r["caption"]) for r in rows} == {
        (sharegpt4v.ORIGIN_LONG, CLEAN),
        (sharegpt4v.ORIGIN_COCO, f"A {CLEAN}"),
    }
