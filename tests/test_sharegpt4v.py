"""ShareGPT4V reader: first sentences, COCO captions, caption rows, the ShareGPT4V-1k split, and the
fixture writer's files in the published layouts."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.captions import CaptionRules, sample_key
from pipelines.sharegpt4v import (
    coco_captions_by_file,
    first_sentence,
    sharegpt4v_caption_rows,
    split_of_record,
    split_validation,
)
from tests.corpus_fixtures import write_sharegpt4v_fixture

RULES = CaptionRules(max_caption_chars=120, long_caption_min_words=5)
ROOT = "s3://bucket/sharegpt4v"
LONG = "The image shows a dog on a sofa. A lamp stands beside it."


def record(image="coco/train2017/000000000009.jpg", reply=LONG, **extra):
    turns = [{"from": "human", "value": "<image>\nWhat is in the photo?"}, {"from": "gpt", "value": reply}]
    return {"id": "000000000009", "image": image, "conversations": turns, **extra}


def summary(rows):
    return [(r["origin"], r["kind"], r["caption"], r["reason"]) for r in rows]


# --- first_sentence ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,first",
    [
        (LONG, "The image shows a dog on a sofa."),
        ("A single sentence without a full stop", "A single sentence without a full stop"),
        ("A single sentence.", "A single sentence."),
        ("Mr. Smith holds a 3.5 kg fish. It is big.", "Mr. Smith holds a 3.5 kg fish."),
        ("Tools, e.g. A hammer, lie here. Next.", "Tools, e.g. A hammer, lie here."),
        ("Fruit (i.e. Apples) and J. R. Tolkien books. Next.", "Fruit (i.e. Apples) and J. R. Tolkien books."),
        ("Version 2.0 is shown. etc. and more", "Version 2.0 is shown. etc. and more"),  # lower-case goes on
        ("What a view! The sea is calm.", "What a view!"),
        ('He said "Stop." Then he left.', 'He said "Stop."'),
        ("A dog.\n\nIt sleeps.", "A dog."),
        ("  Padded   text.  Second. ", "Padded text."),
        ("It costs $3. 5 people came.", "It costs $3."),
        ("Is it wet? No. The sky is clear.", "Is it wet?"),
        ("Is it a bus no. It is a van.", "Is it a bus no."),
    ],
)
def test_first_sentence_examples(text, first):
    assert first_sentence(text) == first


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(["A", "dog", "Mr.", "e.g.", "3.5", "sits.", "Runs!", "why?", "The", "x"]), max_size=20
    ).map(" ".join)
)
def test_first_sentence_is_a_prefix_of_the_cleaned_text(text):
    first = first_sentence(text)
    cleaned = " ".join(text.split())
    assert cleaned.startswith(first)
    assert first == cleaned or first[-1] in ".!?\"')]"
    assert first_sentence(first) == first


# --- COCO captions -------------------------------------------------------------------------


def test_coco_captions_by_file_keeps_annotation_order_and_first_five():
    data = {
        "images": [
            {"id": 9, "file_name": "000000000009.jpg"},
            {"id": 7, "file_name": "b.jpg"},
            {"id": 3, "file_name": "none.jpg"},
        ],
        "annotations": [
            {"image_id": 9, "id": 50, "caption": "c0"},
            {"image_id": 7, "id": 1, "caption": "b0"},
            *[{"image_id": 9, "id": 10 + k, "caption": f"c{k}"} for k in range(1, 7)],
        ],
    }
    assert coco_captions_by_file(data) == {
        "000000000009.jpg": ["c0", "c1", "c2", "c3", "c4"],
        "b.jpg": ["b0"],
        "none.jpg": [],
    }


def test_coco_annotation_of_unknown_image_is_an_error():
    with pytest.raises(ValueError, match="unknown image 5"):
        coco_captions_by_file({"images": [], "annotations": [{"image_id": 5, "id": 1, "caption": "c"}]})


# --- caption rows --------------------------------------------------------------------------


def test_coco_record_gives_long_first_sentence_and_coco_rows():
    coco = {"000000000009.jpg": ["A dog.", "  a  dog on a sofa ", ""]}
    rows = sharegpt4v_caption_rows(record(reply=LONG.replace(". ", ".\n\n")), ROOT, coco, RULES)
    source = "s3://bucket/sharegpt4v/coco/train2017/000000000009.jpg"
    assert {r["source"] for r in rows} == {source}
    assert summary(rows) == [
        ("sharegpt4v", "long", LONG, ""),
        ("sharegpt4v-first-sentence", "short", "The image shows a dog on a sofa.", ""),
        ("coco", "short", "A dog.", ""),
        ("coco", "short", "a dog on a sofa", ""),
        ("coco", "short", "", "empty_caption"),
    ]


def test_single_sentence_caption_has_no_first_sentence_row_and_sam_has_no_coco_rows():
    coco = {"sa_1.jpg": ["never used"]}
    rows = sharegpt4v_caption_rows(record("sam/images/sa_1.jpg", "One sentence."), "/data/root/", coco, RULES)
    assert summary(rows) == [("sharegpt4v", "long", "One sentence.", "")]
    assert rows[0]["source"] == "/data/root/sam/images/sa_1.jpg"
    assert len(sharegpt4v_caption_rows(record(), ROOT, None, RULES)) == 2  # no COCO captions given


def test_first_gpt_reply_is_the_long_caption():
    rec = record(reply="First.")
    rec["conversations"] += [{"from": "human", "value": "more?"}, {"from": "gpt", "value": "Second."}]
    assert summary(sharegpt4v_caption_rows(rec, ROOT, None, RULES)) == [("sharegpt4v", "long", "First.", "")]


@pytest.mark.parametrize(
    "rec",
    [
        {"id": "1", "conversations": []},
        record(image=None),
        record(image=""),
        record(image=7),
        {"id": "1", "image": "sam/images/a.jpg"},
        {"id": "1", "image": "sam/images/a.jpg", "conversations": [{"from": "human", "value": "q"}]},
        {"id": "1", "image": "sam/images/a.jpg", "conversations": "text"},
        record(reply=None),
        record(reply=["a list"]),
        "not a dict",
        None,
    ],
)
def test_malformed_record_gives_one_row(rec):
    rows = sharegpt4v_caption_rows(rec, ROOT, {}, RULES)
    assert [r["reason"] for r in rows] == ["malformed_record"] and rows[0]["caption"] == ""


@pytest.mark.parametrize(
    "image",
    [
        "../secret.jpg",
        "coco/../../etc/passwd",
        "/etc/passwd",
        "\\\\server\\share\\a.jpg",
        "C:\\images\\a.jpg",
        "s3://other/a.jpg",
        "sam\\..\\..\\a.jpg",
    ],
)
def test_path_traversal_is_rejected(image):
    rows = sharegpt4v_caption_rows(record(image=image), ROOT, {}, RULES)
    assert [(r["source"], r["reason"]) for r in rows] == [("", "bad_path")]


def test_long_caption_rejections_keep_coco_rows():
    coco = {"000000000009.jpg": ["A dog."]}
    for reply, reason in [(" \n ", "empty_caption"), ("x" * (RULES.max_caption_chars + 1), "caption_too_long")]:
        rows = sharegpt4v_caption_rows(record(reply=reply), ROOT, coco, RULES)
        assert summary(rows) == [("sharegpt4v", "long", "", reason), ("coco", "short", "A dog.", "")]


# --- validation split ----------------------------------------------------------------------


def test_first_records_are_the_validation_split():
    assert [split_of_record(i, n_val=2) for i in range(4)] == ["validation", "validation", "train", "train"]
    assert split_of_record(999) == "validation" and split_of_record(1000) == "train"
    assert split_validation(5, n_val=2) == (range(0, 2), range(2, 5))
    assert split_validation(1500) == (range(1000), range(1000, 1500))
    with pytest.raises(ValueError):
        split_validation(3, n_val=5)
    with pytest.raises(ValueError):
        split_of_record(-1)


# --- fixture writer ------------------------------------------------------------------------


def test_fixture_files_have_the_published_layouts(tmp_path):
    fx = write_sharegpt4v_fixture(tmp_path, n_records=6)
    records = json.loads(fx.json_path.read_text())
    assert isinstance(records, list) and len(records) == len(fx.records) == 6 + 7
    good = [r for r in records if r["id"].isdigit()]  # the bad records have ids "x0", "x1", ...
    assert len(good) == 6
    for rec in good:
        assert set(rec) == {"id", "image", "conversations"}
        assert [t["from"] for t in rec["conversations"]] == ["human", "gpt"]
        assert rec["conversations"][0]["value"].startswith("<image>\n")
    images = {r["image"] for r in good}
    assert {i.split("/")[0] for i in images} == {"coco", "sam"}
    for image in images:
        assert (fx.image_root / image).read_bytes()[:2] == b"\xff\xd8"  # JPEG
    coco = json.loads(fx.coco_captions_json.read_text())
    assert set(coco) >= {"images", "annotations"}
    assert {a["image_id"] for a in coco["annotations"]} == {i["id"] for i in coco["images"]}
    assert all(len(v) == 5 for v in coco_captions_by_file(coco).values())
    assert {"coco/train2017/" + i["file_name"] for i in coco["images"]} <= images


@pytest.mark.parametrize("n_records,n_val,image_root", [(6, 3, None), (9, 5, "s3://bucket/copy/")])
def test_fixture_expectations_match_the_reader(tmp_path, n_records, n_val, image_root):
    fx = write_sharegpt4v_fixture(tmp_path, n_records=n_records)
    records = json.loads(fx.json_path.read_text())
    coco = coco_captions_by_file(json.loads(fx.coco_captions_json.read_text()))
    root = str(fx.image_root) if image_root is None else image_root
    for indices in split_validation(len(records), n_val):
        captions, reasons = {}, Counter()
        for i in indices:
            for row in sharegpt4v_caption_rows(records[i], root, coco, CaptionRules()):
                if row["reason"]:
                    reasons[row["reason"]] += 1
                else:
                    captions.setdefault(row["source"], set()).add(row["caption"])
        assert captions == fx.expected_captions(indices, image_root)
        assert {sample_key(s) for s in captions} == fx.expected_keys(indices, image_root)
        assert reasons == fx.expected_reasons(indices)
    if image_root is None:  # every expected source is a JPEG on disk
        assert all(Path(s).read_bytes()[:2] == b"\xff\xd8" for s in fx.expected_captions(range(len(records))))
    train = split_validation(len(records), n_val)[1]
    assert set(fx.expected_reasons(train)) == {"malformed_record", "bad_path", "empty_caption", "caption_too_long"}
    assert fx.expected_reasons(range(n_val)) == Counter({"malformed_record": 1})


# --- streaming the caption JSON (prepare_sharegpt4v.stream_records, no Ray) -----------------


def streamed(path, first, stop, block=3) -> list[list]:
    from pipelines.prepare_sharegpt4v import stream_records

    batches = stream_records({"uri": np.array([str(path)], dtype=object)}, first, stop, block)
    return [[json.loads(t) for t in b["record"]] for b in batches]


def test_the_caption_json_is_streamed_in_blocks_of_each_split(tmp_path):
    records = [{"image": f"sam/{i}.jpg", "conversations": [{"from": "gpt", "value": f"c{i}"}]} for i in range(10)] + [
        "not a record"
    ]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(records, indent=2))
    validation, train = streamed(path, 0, 4), streamed(path, 4, None)
    assert [len(b) for b in validation] == [3, 1] and [len(b) for b in train] == [3, 3, 1]
    assert sum(validation, []) == records[:4] and sum(train, []) == records[4:]
    assert streamed(path, 0, 11) and streamed(path, 11, None) == []


def test_a_validation_split_longer_than_the_file_is_an_error(tmp_path):
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([{"image": "a.jpg"}] * 3))
    with pytest.raises(ValueError, match="needs 5 records.*has 3"):
        streamed(path, 0, 5)


def test_a_caption_file_that_is_not_a_json_list_is_refused_before_any_work(tmp_path):
    from pipelines.prepare_sharegpt4v import check_json_array

    (tmp_path / "a.json").write_text('  {"annotations": []}')
    with pytest.raises(SystemExit, match="not a JSON list"):
        check_json_array(str(tmp_path / "a.json"))
    (tmp_path / "b.json").write_text("\n [ ]")
    check_json_array(str(tmp_path / "b.json"))
