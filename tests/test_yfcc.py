"""YFCC15M reader: metadata/subset/joined-table parsing, text cleaning, camera titles, caption rows,
and the fixture writer's files in the published layouts."""

from __future__ import annotations

import html
import re
import unicodedata
import urllib.request
from collections import Counter
from urllib.parse import quote_plus

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.captions import CaptionRules
from pipelines.mirror import LoopbackMirror
from pipelines.yfcc import (
    NO_PHOTO_ID,
    clean_yfcc_text,
    decode_metadata_lines,
    is_camera_default_title,
    joined_record,
    parse_metadata_line,
    parse_subset_line,
    yfcc_caption_rows,
)
from tests.corpus_fixtures import MISSING_PHOTO_ID, YFCC_MIRROR_DIR, write_yfcc_fixture

RULES = CaptionRules(max_caption_chars=40, long_caption_min_words=5)
URL = "http://farm4.staticflickr.com/3/12345_abcdef.jpg"


def metadata_fields(photo_id="12345", title="A+title", description="", url=URL, marker="0"):
    """The 23 published columns with the ones the reader uses filled in."""
    fields = [
        photo_id,
        "1@N00",
        "nick",
        "2012-05-12 12:34:56.0",
        "1336826096",
        "Canon",
        title,
        description,
        "tags",
        "",
        "",
        "",
        "",
        "http://flickr.com/p/1",
        url,
        "Attribution License",
        "http://cc/by",
        "3",
        "4",
        "abc",
        "def",
        "jpg",
        marker,
    ]
    assert len(fields) == 23
    return fields


def record(title="", description="", url=URL, is_video=False, reason=""):
    return {
        "photo_id": 1,
        "url": url,
        "title": title,
        "description": description,
        "is_video": is_video,
        "reason": reason,
    }


def kept(rows):
    return [(r["origin"], r["caption"]) for r in rows if not r["reason"]]


def reasons(rows):
    return [r["reason"] for r in rows if r["reason"]]


# --- parsing -------------------------------------------------------------------------------


def test_23_column_line_is_parsed():
    line = "\t".join(metadata_fields(title="Sunset+%26+sea", description="d%C3%A9j%C3%A0")) + "\n"
    assert parse_metadata_line(line) == {
        "photo_id": 12345,
        "url": URL,
        "title": "Sunset+%26+sea",
        "description": "d%C3%A9j%C3%A0",
        "is_video": False,
        "reason": "",
    }


def test_25_column_line_drops_line_number_and_hash():
    fields = metadata_fields(marker="1")
    line = "\t".join(["17", fields[0], "0123456789abcdef0123456789abcdef", *fields[1:]]) + "\r\n"
    parsed = parse_metadata_line(line)
    assert (parsed["photo_id"], parsed["url"], parsed["title"], parsed["is_video"]) == (12345, URL, "A+title", True)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "a\tb\tc",
        "\t".join(["x"] * 24),
        "\t".join(["x"] * 26),
        "\t".join(metadata_fields(photo_id="12a")),
        "\t".join(metadata_fields(photo_id="-5")),
        "\t".join(metadata_fields(photo_id="")),
    ],
)
def test_wrong_column_count_or_id_is_malformed(line):
    parsed = parse_metadata_line(line)
    assert (parsed["reason"], parsed["photo_id"]) == ("malformed_row", NO_PHOTO_ID)
    assert yfcc_caption_rows(parsed, RULES) == [
        {"source": "", "caption": "", "kind": "", "origin": "yfcc-title", "reason": "malformed_row"}
    ]


def test_subset_lines_and_header():
    assert parse_subset_line("0\t6985418911\t4e2ae4c5b6dd5c7a3c45a3de1eb6f2\n") == 6985418911
    assert parse_subset_line("line_number\tphotoid\tphoto_hash") is None
    assert parse_subset_line("1\t2") is None
    assert parse_subset_line("1\tx\th") is None


def test_the_photo_id_of_a_line_is_read_from_either_layout():
    from pipelines.prepare_yfcc15m import line_photo_id

    fields = ["6985418911"] + ["x"] * 22
    assert line_photo_id("\t".join(fields)) == 6985418911
    assert line_photo_id("\t".join(["17", "6985418911", "hash"] + fields[1:])) == 6985418911
    assert line_photo_id("\t".join(fields[:-1])) == NO_PHOTO_ID  # 22 columns
    assert line_photo_id("\t".join(["abc"] + fields[1:])) == NO_PHOTO_ID
    assert line_photo_id("this\tline\tis\tmalformed") == NO_PHOTO_ID


def test_non_utf8_bytes_become_replacement_characters():
    data = b"1\t2\th\n\n" + b"Caf\xe9\r\n"
    assert decode_metadata_lines(data) == ["1\t2\th", "Caf\ufffd"]


@pytest.mark.parametrize(
    "marker,is_video",
    [(1, True), ("1", True), (True, True), (1.0, True), (0, False), ("0", False), (None, False), (float("nan"), False)],
)
def test_joined_record_marker(marker, is_video):
    row = {"id": "7", "url": URL, "title": "t", "description": None, "marker": marker}
    assert joined_record(row) == {
        "photo_id": 7,
        "url": URL,
        "title": "t",
        "description": "",
        "is_video": is_video,
        "reason": "",
    }


def test_joined_record_without_marker_or_id():
    assert joined_record({"id": 7.0, "url": URL, "title": float("nan"), "description": "d"}) == {
        "photo_id": 7,
        "url": URL,
        "title": "",
        "description": "d",
        "is_video": False,
        "reason": "",
    }
    assert joined_record({"id": None, "url": URL})["reason"] == "malformed_row"
    assert joined_record({"id": 1.5, "url": URL})["reason"] == "malformed_row"


# --- clean_yfcc_text -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("Sunset+at+the+pier", "Sunset at the pier"),
        ("C%2B%2B+100%25", "C++ 100%"),  # decoded once: "+" and "%" survive
        ("50%+off+%zz+%4", "50% off %zz %4"),  # invalid escapes left alone
        ("%3Cb%3EBold%3C%2Fb%3E+text", "Bold text"),
        ("a%3Cbr%2F%3Eb", "a b"),  # a tag separates words
        ("Pier+%26amp%3Bamp%3B+sea", "Pier & sea"),  # twice-escaped entity
        ("%26lt%3Bi%26gt%3Bhi%26lt%3B%2Fi%26gt%3B", "hi"),  # escaped tags are tags too
        ("1+%3C+2+and+3+%3E+2", "1 < 2 and 3 > 2"),  # not tags
        ("caf%C3%A9", "caf\u00e9"),
        ("bad%E9byte", "bad\ufffdbyte"),
        ("+a%09%0A%0Ab++", "a b"),
        ("%3C%21--+comment+--%3Ekept", "kept"),
    ],
)
def test_clean_yfcc_text_examples(raw, clean):
    assert clean_yfcc_text(raw) == clean


PIECES = st.sampled_from(
    [*"ab <>/&;#%+=\"'\n\t\u00a0é", "&amp;", "&lt;", "<b>", "</i>", "%2B", "%3C", "%26", "%3E", "%20", "&#43;", "%E9"]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(PIECES, max_size=16).map("".join))
def test_clean_yfcc_text_properties(raw):
    out = clean_yfcc_text(raw)
    assert out == out.strip() and not re.search(r"\s\s|[\t\n\u00a0]", out)
    assert re.search(r"<[/!]?[A-Za-z][^<>]*>", out) is None
    # Idempotent except for URL decoding, which is applied once ("C++" must stay "C++").
    if "%" not in out and "+" not in out:
        assert clean_yfcc_text(out) == out


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cf", "Zs", "Zl", "Zp"), blacklist_characters="<>&"),
        min_size=1,
    )
)
def test_url_encoding_round_trips(word):
    """Visible text survives URL encoding, up to the NFC form every caption is given."""
    assert clean_yfcc_text(quote_plus(word)) == unicodedata.normalize("NFC", word)


# --- camera titles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "title",
    [
        "IMG_1234",
        "IMG-1234",
        "img1234.jpg",
        "IMG_20120512_123456",
        "DSC01234",
        "DSCN1234.JPG",
        "DSCF1234",
        "dsc_1234.jpeg",
        "P1010001",
        "PICT0001",
        "CIMG1234",
        "DCP_1234",
        "100_1234",
        "SAM_1234",
        "GOPR1234.MP4",
        "20120512_123456",
        " IMG_1.png ",
    ],
)
def test_camera_default_titles(title):
    assert is_camera_default_title(title)


@pytest.mark.parametrize(
    "title",
    [
        "Sunset at the pier",
        "IMG of my cat",
        "IMG_1234 at the beach",
        "DSC",
        "P101",
        "my IMG_1234",
        "2012",
        "100_12345x",
        "",
    ],
)
def test_real_titles_are_not_camera_defaults(title):
    assert not is_camera_default_title(title)


# --- caption rows --------------------------------------------------------------------------


def test_title_and_description_become_rows():
    rows = yfcc_caption_rows(record("Sunset+at+the+pier", "A+%3Cb%3Elong%3C%2Fb%3E+view"), RULES)
    assert rows == [
        {"source": URL, "caption": "Sunset at the pier", "kind": "", "origin": "yfcc-title", "reason": ""},
        {"source": URL, "caption": "A long view", "kind": "", "origin": "yfcc-description", "reason": ""},
    ]


@pytest.mark.parametrize(
    "rec,expected",
    [
        (record("t", is_video=True), ["video"]),
        (record("t", url=""), ["bad_url"]),
        (record("t", url="ftp://x/a.jpg"), ["bad_url"]),
        (record("t", reason="malformed_row"), ["malformed_row"]),
    ],
)
def test_record_level_rejections_give_one_row(rec, expected):
    rows = yfcc_caption_rows(rec, RULES)
    assert reasons(rows) == expected and len(rows) == 1 and rows[0]["caption"] == ""


def test_field_rejections():
    assert reasons(yfcc_caption_rows(record("IMG_0042.JPG", "ok"), RULES)) == ["camera_default_title"]
    assert kept(yfcc_caption_rows(record("IMG_0042.JPG", "ok"), RULES)) == [("yfcc-description", "ok")]
    assert reasons(yfcc_caption_rows(record("", "+%20"), RULES)) == ["empty_caption"] * 2
    too_long = "x" * (RULES.max_caption_chars + 1)
    rows = yfcc_caption_rows(record("ok", too_long), RULES)
    assert reasons(rows) == ["caption_too_long"] and kept(rows) == [("yfcc-title", "ok")]
    at_limit = "x" * RULES.max_caption_chars
    assert reasons(yfcc_caption_rows(record("ok", f"%3Cb%3E{at_limit}%3C%2Fb%3E"), RULES)) == []


def test_identical_title_and_description_kept_once():
    rows = yfcc_caption_rows(record("Sunset+pier", "Sunset++%3Cb%3Epier%3C%2Fb%3E"), RULES)
    assert kept(rows) == [("yfcc-title", "Sunset pier")]
    assert reasons(rows) == ["duplicate_caption"]


@settings(max_examples=100, deadline=None)
@given(st.text(), st.text(), st.booleans(), st.sampled_from([URL, "", "x"]))
def test_every_record_yields_rows_that_add_up(title, description, is_video, url):
    rows = yfcc_caption_rows(record(title, description, url, is_video), RULES)
    record_level = is_video or url != URL
    assert len(rows) == (1 if record_level else 2)
    assert all(bool(r["reason"]) != bool(r["caption"]) for r in rows)
    assert all(r["source"] == url for r in rows)
    assert all(len(r["caption"]) <= RULES.max_caption_chars for r in rows)


# --- fixture writer ------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [23, 25])
def test_fixture_files_have_the_published_layouts(tmp_path, columns):
    fx = write_yfcc_fixture(tmp_path, "http://127.0.0.1:8123/", n_photos=6, columns=columns)
    raw_lines = fx.metadata_tsv.read_bytes().splitlines()
    counts = Counter(len(line.split(b"\t")) for line in raw_lines)
    assert counts == Counter({columns: len(raw_lines) - 1, 4: 1})  # one malformed line
    with pytest.raises(UnicodeDecodeError):
        fx.metadata_tsv.read_bytes().decode("utf-8")
    subset_lines = fx.subset_tsv.read_text().splitlines()
    assert [parse_subset_line(x) for x in subset_lines] == [None, *fx.subset_ids]
    assert MISSING_PHOTO_ID in fx.subset_ids
    csv, parquet = pd.read_csv(fx.joined_csv), pd.read_parquet(fx.joined_parquet)
    assert list(csv.columns) == list(parquet.columns) == ["id", "url", "title", "description", "marker"]
    assert len(csv) == len(parquet) == fx.n_subset_records
    for url in fx.expected_captions:
        relative = url.removeprefix("http://127.0.0.1:8123/")
        assert (fx.mirror_root / relative).read_bytes()[:2] == b"\xff\xd8"  # JPEG


def rows_by_source(records):
    captions, counts = {}, Counter()
    for rec in records:
        for row in yfcc_caption_rows(rec, CaptionRules()):
            if row["reason"]:
                counts[row["reason"]] += 1
            else:
                captions.setdefault(row["source"], set()).add(row["caption"])
    return captions, counts


@pytest.mark.parametrize("columns", [23, 25])
def test_fixture_expectations_match_the_reader_on_every_layout(tmp_path, columns):
    fx = write_yfcc_fixture(tmp_path, None, n_photos=6, columns=columns)
    parsed = [parse_metadata_line(x) for x in decode_metadata_lines(fx.metadata_tsv.read_bytes())]
    assert Counter(p["reason"] for p in parsed)["malformed_row"] == fx.malformed_lines
    subset = set(fx.subset_ids)
    from_metadata = [p for p in parsed if p["photo_id"] in subset]
    assert {p["photo_id"] for p in parsed} - subset - {NO_PHOTO_ID} == set(fx.metadata_only_ids)
    tables = [
        pd.read_csv(fx.joined_csv),
        pd.read_csv(fx.joined_csv, keep_default_na=False),
        pd.read_parquet(fx.joined_parquet),
    ]
    for records in [from_metadata] + [[joined_record(r) for r in t.to_dict("records")] for t in tables]:
        assert len(records) == fx.n_subset_records
        assert rows_by_source(records) == (fx.expected_captions, fx.expected_reasons)
    assert {
        "video",
        "camera_default_title",
        "empty_caption",
        "caption_too_long",
        "bad_url",
        "duplicate_caption",
        "non_utf8_caption",
    } <= set(fx.expected_reasons)
    assert not any("\ufffd" in c for cs in fx.expected_captions.values() for c in cs)
    assert html.unescape("&amp;") in {c[5] for cs in fx.expected_captions.values() for c in cs if c.startswith("Pier")}


def test_fixture_urls_are_served_by_the_loopback_mirror(tmp_path):
    (tmp_path / YFCC_MIRROR_DIR).mkdir()  # served before the writer knows the port
    with LoopbackMirror(tmp_path / YFCC_MIRROR_DIR) as mirror:
        fx = write_yfcc_fixture(tmp_path, mirror.base_url, n_photos=3)
        assert len(fx.expected_keys) == len(fx.expected_captions) > 3
        for url in fx.expected_captions:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.read()[:2] == b"\xff\xd8"
