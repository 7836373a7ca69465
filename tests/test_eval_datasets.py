"""Benchmark readers on tiny fixtures written in the real layouts: an ImageFolder with class
names and templates (and the ImageNet-A/R/O subset form), a Karpathy-split JSON, COCO's
captions_val2017.json, Flickr30k's token file, an Urban1k-style folder, a ShareGPT4V-style
shard build, SugarCrepe's JSON files and CLIP_benchmark's WebDataset layout (checked against
CLIP_benchmark's own reader), locally and on a loopback S3 server."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import load_image_folder, load_karpathy, load_long_caption_folder


def write_image(path: Path, image_format: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), (200, 55, 0)).save(path, format=image_format)
    return path


# ---------------------------------------------------------------- image folder


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "tiny_cls"
    root.mkdir()
    (root / "classnames.txt").write_text("cat\ndog\nred fox\n")
    (root / "templates.txt").write_text("a photo of a {c}.\n\nart of the {c}\n")  # blank line ignored
    write_image(root / "000" / "b.jpg")
    write_image(root / "000" / "a.jpeg")
    write_image(root / "001" / "c.jpg")
    write_image(root / "002" / "d.PNG", "PNG")  # suffixes match in any case
    (root / "001" / "notes.txt").write_text("not an image")
    (root / "001" / ".DS_Store").write_bytes(b"\0")
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are never classes
    return root


def test_load_image_folder(image_folder: Path):
    dataset = load_image_folder(image_folder)
    assert dataset.name == "tiny_cls"
    assert [Path(p).relative_to(image_folder).as_posix() for p in dataset.images] == [
        "000/a.jpeg",
        "000/b.jpg",
        "001/c.jpg",
        "002/d.PNG",
    ]
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1, 2])
    assert dataset.labels.dtype == np.int64
    assert dataset.classnames == ["cat", "dog", "red fox"]
    assert dataset.templates == ["a photo of a {c}.", "art of the {c}"]
    assert (dataset.n_images, dataset.n_classes) == (4, 3)
    assert all(Image.open(p).size for p in dataset.images)


def test_class_index_follows_lexicographic_folder_order(tmp_path: Path):
    # ImageFolder sorts names as strings: "10" comes before "9".
    (tmp_path / "classnames.txt").write_text("ten\nnine\n")
    (tmp_path / "templates.txt").write_text("{c}\n")
    write_image(tmp_path / "9" / "x.jpg")
    write_image(tmp_path / "10" / "y.jpg")
    dataset = load_image_folder(tmp_path, name="order")
    assert [Path(p).parent.name for p in dataset.images] == ["10", "9"]
    np.testing.assert_array_equal(dataset.labels, [0, 1])
    assert dataset.name == "order"


def test_missing_classnames_file(image_folder: Path):
    (image_folder / "classnames.txt").unlink()
    with pytest.raises(FileNotFoundError, match="class names"):
        load_image_folder(image_folder)


def test_missing_templates_file(image_folder: Path):
    (image_folder / "templates.txt").unlink()
    with pytest.raises(FileNotFoundError, match="templates"):
        load_image_folder(image_folder)


def test_class_folder_count_must_match_classnames(image_folder: Path):
    (image_folder / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(ValueError, match="3 class folders but .* names 2 classes"):
        load_image_folder(image_folder)


@pytest.mark.parametrize("template", ["a photo of a cat", "a {c} and {}", "a {class}"])
def test_template_must_take_the_class_name(image_folder: Path, template: str):
    (image_folder / "templates.txt").write_text(f"a photo of a {{c}}.\n{template}\n")
    with pytest.raises(ValueError, match=re.escape(repr(template))):
        load_image_folder(image_folder)


def test_folder_without_images(tmp_path: Path):
    (tmp_path / "classnames.txt").write_text("cat\n")
    (tmp_path / "templates.txt").write_text("{c}\n")
    (tmp_path / "000").mkdir()
    (tmp_path / "000" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path)


# ---------------------------------------------------------------- Karpathy JSON


def karpathy_entry(filename: str, split: str, captions: list[str], filepath: str | None = "val2014") -> dict:
    entry = {"filename": filename, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]}
    return entry | ({"filepath": filepath} if filepath is not None else {})


@pytest.fixture
def karpathy_json(tmp_path: Path) -> Path:
    entries = [
        karpathy_entry("t0.jpg", "train", ["a train caption"], filepath="train2014"),
        karpathy_entry("e0.jpg", "test", ["a dog runs. ", "a brown dog"]),
        karpathy_entry("v0.jpg", "val", ["a val caption"]),
        karpathy_entry("e1.jpg", "test", ["two cats", "cats on a sofa", "a sofa"]),
        karpathy_entry("e2.jpg", "test", ["a bus"], filepath=None),  # Flickr30k entries have no filepath
        karpathy_entry("t1.jpg", "train", ["another train caption", "more"], filepath="train2014"),
    ]
    for entry in entries:
        write_image(tmp_path / entry.get("filepath", "") / entry["filename"])
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


def test_load_karpathy_test_split(karpathy_json: Path):
    dataset = load_karpathy(karpathy_json)
    root = karpathy_json.parent
    assert dataset.images == [str(root / "val2014" / "e0.jpg"), str(root / "val2014" / "e1.jpg"), str(root / "e2.jpg")]
    assert dataset.captions == ["a dog runs.", "a brown dog", "two cats", "cats on a sofa", "a sofa", "a bus"]
    np.testing.assert_array_equal(dataset.text_to_image, [0, 0, 1, 1, 1, 2])
    assert (dataset.protocol, dataset.name) == ("karpathy-test", "dataset_coco")
    assert (dataset.n_images, dataset.n_texts) == (3, 6)


def test_load_karpathy_train_split_with_image_root(karpathy_json: Path, tmp_path: Path):
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (karpathy_json.parent / "train2014").rename(moved / "train2014")
    dataset = load_karpathy(str(karpathy_json), image_root=str(moved), split="train", name="mscoco")
    assert dataset.images == [str(moved / "train2014" / "t0.jpg"), str(moved / "train2014" / "t1.jpg")]
    assert dataset.captions == ["a train caption", "another train caption", "more"]
    np.testing.assert_array_equal(dataset.text_to_image, [0, 1, 1])
    assert (dataset.protocol, dataset.name) == ("karpathy-train", "mscoco")


def test_karpathy_unknown_split_lists_the_splits(karpathy_json: Path):
    with pytest.raises(ValueError, match=re.escape("['test', 'train', 'val']")):
        load_karpathy(karpathy_json, split="restval")


def test_karpathy_missing_image(karpathy_json: Path):
    (karpathy_json.parent / "e2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 images"):
        load_karpathy(karpathy_json)


def test_karpathy_image_without_captions(karpathy_json: Path):
    data = json.loads(karpathy_json.read_text())
    data["images"][1]["sentences"] = []
    karpathy_json.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="no captions"):
        load_karpathy(karpathy_json)


# ---------------------------------------------------------------- Urban1k-style folder


@pytest.fixture
def long_caption_folder(tmp_path: Path) -> Path:
    root = tmp_path / "Urban1k"
    for stem, caption in [("1", "A long street scene ..."), ("10", "A harbour at dusk ...\n"), ("2", "A market.")]:
        write_image(root / "image" / f"{stem}.jpg")
        (root / "caption").mkdir(exist_ok=True)
        (root / "caption" / f"{stem}.txt").write_text(caption)
    return root


def test_load_long_caption_folder(long_caption_folder: Path):
    dataset = load_long_caption_folder(long_caption_folder)
    assert [Path(p).name for p in dataset.images] == ["1.jpg", "10.jpg", "2.jpg"]
    assert dataset.captions == ["A long street scene ...", "A harbour at dusk ...", "A market."]
    np.testing.assert_array_equal(dataset.text_to_image, [0, 1, 2])
    assert (dataset.name, dataset.protocol) == ("Urban1k", "long-caption")


def test_long_caption_folder_needs_a_caption_per_image(long_caption_folder: Path):
    (long_caption_folder / "caption" / "10.txt").unlink()
    with pytest.raises(ValueError, match=re.escape("['10']")):
        load_long_caption_folder(long_caption_folder)


def test_long_caption_folder_needs_both_folders(long_caption_folder: Path):
    for path in (long_caption_folder / "caption").iterdir():
        path.unlink()
    (long_caption_folder / "caption").rmdir()
    with pytest.raises(FileNotFoundError, match="caption"):
        load_long_caption_folder(long_caption_folder)
