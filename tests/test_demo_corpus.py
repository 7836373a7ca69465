"""The demo corpus: scenes, captions, determinism, the CC12M-style TSV and the evaluation layout."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.demo_corpus import (
    BACKGROUND_PHRASES,
    COLOURS,
    CORRUPT_ROW_CAPTION,
    DEAD_ROW_CAPTION,
    POSITION_PHRASES,
    SHAPES,
    ZEROSHOT_TEMPLATES,
    Scene,
    SceneObject,
    class_names,
    long_caption,
    render_scene,
    sample_scene,
    short_captions,
    write_cc12m_tsv,
    write_demo_corpus,
)

SMALL = dict(n_images=40, image_size=64, seed=3, n_eval_per_class=2, n_eval_retrieval=12)
BASE_URL = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_demo_corpus(tmp_path_factory.mktemp("demo"), **SMALL)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def records(corpus):
    return read_jsonl(corpus.corpus_jsonl)


def named_classes(caption: str, scene: Scene) -> set[str]:
    return {o.class_name for o in scene.objects if o.class_name in caption}


def sampled_scenes(n: int, seed: int = 0) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def test_vocabulary_sizes():
    assert len(COLOURS) >= 8 and len(SHAPES) >= 5
    assert len(set(COLOURS.values())) == len(COLOURS)
    assert len(class_names()) == len(COLOURS) * len(SHAPES) == len(set(class_names()))
    assert all("{c}" in template for template in ZEROSHOT_TEMPLATES)


def test_scenes_have_one_to_four_objects_in_distinct_cells():
    scenes = sampled_scenes(500)
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}
    for scene in scenes:
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        assert len({o.class_name for o in scene.objects}) == len(scene.objects)
        assert scene.background in BACKGROUND_PHRASES


def test_sample_scene_honours_n_objects():
    rng = np.random.default_rng(1)
    assert all(len(sample_scene(rng, n_objects=3).objects) == 3 for _ in range(20))
    with pytest.raises(ValueError):
        sample_scene(rng, n_objects=0)


def test_short_captions_name_a_strict_subset_or_the_single_object():
    rng = np.random.default_rng(2)
    for scene in sampled_scenes(300):
        captions = short_captions(scene, rng)
        assert 2 <= len(captions) <= 4
        assert len(set(captions)) == len(captions)
        for caption in captions:
            named = named_classes(caption, scene)
            assert named, caption
            if len(scene.objects) == 1:
                assert named == {scene.objects[0].class_name}
            else:
                assert len(named) < len(scene.objects), caption


def test_long_caption_mentions_every_object_and_the_background():
    for scene in sampled_scenes(300):
        caption = long_caption(scene)
        assert caption.lower().startswith(BACKGROUND_PHRASES[scene.background])
        for obj in scene.objects:
            described = f"{obj.size} {obj.colour} {obj.shape} {POSITION_PHRASES[obj.position]}"
            assert described in caption


def test_long_caption_of_four_objects_stays_short():
    rng = np.random.default_rng(4)
    longest = max(len(long_caption(sample_scene(rng, n_objects=4)).split()) for _ in range(200))
    assert longest <= 50  # words; about 42 BPE tokens at most, well under CLIP's 77


def test_render_scene_is_rgb_of_requested_size():
    scene = Scene("grey", (SceneObject("red", "circle", "large", "center"),))
    image = render_scene(scene, 96, np.random.default_rng(0))
    assert image.mode == "RGB" and image.size == (96, 96)
    centre = np.asarray(image)[48, 48].astype(int)
    assert centre[0] > 150 and centre[1] < 90 and centre[2] < 90  # red where the circle is


def test_same_seed_gives_identical_bytes(tmp_path, corpus):
    again = write_demo_corpus(tmp_path / "again", **SMALL)
    assert again.corpus_jsonl.read_bytes() == corpus.corpus_jsonl.read_bytes()
    first = sorted(p.relative_to(corpus.out_dir) for p in corpus.out_dir.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again.out_dir) for p in again.out_dir.rglob("*") if p.is_file())
    assert first == second
    assert all((corpus.out_dir / p).read_bytes() == (again.out_dir / p).read_bytes() for p in first)


def test_other_seed_gives_other_corpus(tmp_path, corpus):
    other = write_demo_corpus(tmp_path / "other", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert other.corpus_jsonl.read_bytes() != corpus.corpus_jsonl.read_bytes()


def test_training_images_and_records(corpus, records):
    assert len(records) == SMALL["n_images"]
    for i, record in enumerate(records):
        assert record["path"] == f"images/{i:06d}.jpg"
        with Image.open(corpus.mirror_root / record["path"]) as image:
            assert image.format == "JPEG" and image.size == (SMALL["image_size"],) * 2
        assert 1 <= len(record["objects"]) <= 4
        assert record["long_caption"] == long_caption(
            Scene(record["background"], tuple(SceneObject(**o) for o in record["objects"]))
        )


def test_corrupt_files_do_not_decode(corpus):
    assert len(corpus.corrupt_paths) >= 2
    for path in corpus.corrupt_paths:
        assert path.is_file() and path.is_relative_to(corpus.mirror_root)
        with pytest.raises(OSError):
            with Image.open(path) as image:
                image.load()


def read_tsv_rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_cc12m_tsv_has_one_row_per_caption(tmp_path, corpus, records):
    path = write_cc12m_tsv(corpus, BASE_URL, tmp_path / "cc12m.tsv", n_dead=2, n_corrupt=2)
    rows = read_tsv_rows(path)
    assert all(len(row) == 2 and row[0].startswith(BASE_URL + "/") and row[1] for row in rows)
    n_captions = sum(len(r["short_captions"]) + 1 for r in records)
    assert len(rows) == n_captions + 2 + 2
    urls = Counter(url for url, _ in rows)
    for record in records:
        captions = {caption for url, caption in rows if url == f"{BASE_URL}/{record['path']}"}
        assert urls[f"{BASE_URL}/{record['path']}"] == len(record["short_captions"]) + 1
        assert captions == {*record["short_captions"], record["long_caption"]}
    assert sum(caption == DEAD_ROW_CAPTION for _, caption in rows) == 2
    assert sum(caption == CORRUPT_ROW_CAPTION for _, caption in rows) == 2


def test_cc12m_tsv_dead_and_corrupt_urls_point_where_expected(tmp_path, corpus):
    rows = read_tsv_rows(write_cc12m_tsv(corpus, BASE_URL + "/", tmp_path / "cc12m.tsv"))
    for url, caption in rows:
        local = corpus.mirror_root / url.removeprefix(BASE_URL + "/")
        assert local.is_file() == (caption != DEAD_ROW_CAPTION)
        assert (local.parent.name == "corrupt") == (caption == CORRUPT_ROW_CAPTION)


def test_cc12m_tsv_is_shuffled_deterministically_and_header_is_optional(tmp_path, corpus):
    plain = write_cc12m_tsv(corpus, BASE_URL, tmp_path / "a.tsv").read_text()
    assert write_cc12m_tsv(corpus, BASE_URL, tmp_path / "b.tsv").read_text() == plain
    headed = write_cc12m_tsv(corpus, BASE_URL, tmp_path / "c.tsv", header=True).read_text()
    assert headed == "url\tcaption\n" + plain
    urls = [line.split("\t")[0] for line in plain.splitlines()]
    adjacent = sum(a == b for a, b in zip(urls, urls[1:]))
    assert adjacent < len(urls) // 4  # one image's rows are spread out, not grouped


def test_zeroshot_split_layout(corpus):
    root = corpus.zeroshot_dir
    names = (root / "classnames.txt").read_text().splitlines()
    assert names == class_names() and len(names) == len(COLOURS) * len(SHAPES)
    assert tuple((root / "templates.txt").read_text().splitlines()) == ZEROSHOT_TEMPLATES
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert class_dirs == [f"{i:03d}" for i in range(len(names))]
    for name in class_dirs:
        expected = [f"{j:04d}.jpg" for j in range(SMALL["n_eval_per_class"])]
        assert sorted(p.name for p in (root / name).iterdir()) == expected


def test_zeroshot_images_are_single_objects_of_their_class(corpus):
    records = read_jsonl(corpus.zeroshot_dir / "scenes.jsonl")
    assert len(records) == len(class_names()) * SMALL["n_eval_per_class"]
    for record in records:
        assert (corpus.zeroshot_dir / record["path"]).is_file()
        assert record["path"].startswith(f"{record['label']:03d}/")
        (obj,) = record["objects"]
        assert f"{obj['colour']} {obj['shape']}" == record["classname"]
        assert record["classname"] == class_names()[record["label"]]


def test_zeroshot_class_attributes_name_each_class(corpus):
    attributes = json.loads((corpus.zeroshot_dir / "class_attributes.json").read_text())
    assert set(attributes) == {"colour", "shape"}
    assert [f"{c} {s}" for c, s in zip(attributes["colour"], attributes["shape"])] == class_names()


def test_retrieval_split_is_karpathy_layout(corpus):
    data = json.loads((corpus.retrieval_dir / "dataset_karpathy.json").read_text())
    images = data["images"]
    assert data["dataset"] == "demo" and len(images) == SMALL["n_eval_retrieval"]
    sentids = [s["sentid"] for image in images for s in image["sentences"]]
    assert sentids == list(range(len(sentids)))
    for i, image in enumerate(images):
        assert image["split"] == "test" and image["imgid"] == i
        assert (corpus.retrieval_dir / image["filepath"] / image["filename"]).is_file()
        assert image["sentids"] == [s["sentid"] for s in image["sentences"]]
        assert 2 <= len(image["sentences"]) <= 4
        for sentence in image["sentences"]:
            assert sentence["imgid"] == i
            assert sentence["tokens"] == sentence["raw"].lower().replace(",", "").split()


def test_long_split_matches_retrieval_images(corpus):
    data = json.loads((corpus.retrieval_dir / "dataset_karpathy.json").read_text())
    for i, image in enumerate(data["images"]):
        stem = str(i + 1)
        same = (corpus.long_dir / "image" / f"{stem}.jpg").read_bytes()
        assert same == (corpus.retrieval_dir / "images" / image["filename"]).read_bytes()
        caption = (corpus.long_dir / "caption" / f"{stem}.txt").read_text().splitlines()
        assert len(caption) == 1 and caption[0].endswith(".")
    assert len(list((corpus.long_dir / "caption").iterdir())) == SMALL["n_eval_retrieval"]


def test_retrieval_scenes_are_held_out_from_training(corpus, records):
    def key(record):
        objects = frozenset(json.dumps(o, sort_keys=True) for o in record["objects"])
        return record["background"], objects

    held_out = read_jsonl(corpus.retrieval_dir / "scenes.jsonl")
    train_keys = {key(r) for r in records}
    assert not train_keys & {key(r) for r in held_out}
    assert len({key(r) for r in held_out}) == len(held_out)


def test_empty_evaluation_split_is_allowed(tmp_path):
    corpus = write_demo_corpus(tmp_path, n_images=2, image_size=32, n_eval_per_class=0, n_eval_retrieval=0)
    assert json.loads((corpus.retrieval_dir / "dataset_karpathy.json").read_text())["images"] == []


def test_cli_writes_corpus(tmp_path, capsys):
    from pipelines.demo_corpus import main

    main(["--out", str(tmp_path / "cli"), "--n-images", "3", "--image-size", "32", "--seed", "1"])
    assert len((tmp_path / "cli" / "corpus.jsonl").read_text().splitlines()) == 3
    assert "corpus_jsonl" in capsys.readouterr().out
