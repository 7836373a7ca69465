"""Readers for the formats users already have, each on a fixture written in the exact real
layout: CLIP_benchmark's WebDataset folders (read back by CLIP_benchmark's own reader too),
ImageNet-A's WordNet-id folders (against CLIP_benchmark's class masking), COCO val2017
captions, Flickr30k's token file, a ShareGPT4V-style shard build, SugarCrepe, and S3."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.datasets import (
    load_coco_captions,
    load_flickr_token,
    load_image_folder,
    load_long_caption_build,
    load_sugarcrepe,
    load_wds,
)
from evaluation.datasets.compositional import SUGARCREPE_SUBSETS
from scoring.sets.files import read_image
from pipelines import shards, storage


def image_bytes(colour: tuple[int, int, int], image_format: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(
        buf, format=image_format, **({"lossless": True} if image_format == "WEBP" else {})
    )
    return buf.getvalue()


def write_image(path: Path, colour=(200, 55, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(colour, "JPEG" if path.suffix == ".jpg" else "PNG"))
    return path


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_wds(
    root: Path,
    split: str,
    samples: list[dict[str, bytes]],
    per_shard: int,
    dataset_type=None,
    classnames=None,
    templates=None,
) -> Path:
    """CLIP_benchmark's layout: `<split>/{0..n-1}.tar` + `nshards.txt`, metadata files at the root."""
    (root / split).mkdir(parents=True)
    chunks = [samples[i : i + per_shard] for i in range(0, len(samples), per_shard)]
    for shard, chunk in enumerate(chunks):
        with tarfile.open(root / split / f"{shard}.tar", "w") as tar:
            for index, sample in enumerate(chunk, start=shard * per_shard):
                for ext, data in sample.items():
                    add_member(tar, f"s{index:07d}.{ext}", data)
    (root / split / "nshards.txt").write_text(f"{len(chunks)}\n")
    if dataset_type:
        (root / "dataset_type.txt").write_text(dataset_type + "\n")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    return root


def colour(i: int) -> tuple[int, int, int]:
    return (i * 37 % 256, i * 91 % 256, i * 13 % 256)


def clip_benchmark_wds(root: Path, split: str = "test"):
    from clip_benchmark.datasets.builder import build_wds_dataset

    return build_wds_dataset(
        root.name, transform=lambda image: np.asarray(image.convert("RGB")), split=split, data_dir=str(root)
    )


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# ---------------------------------------------------------------- CLIP_benchmark WebDataset


CLASSNAMES = ["apple", "bear", "red fox"]
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]


@pytest.fixture
def wds_classification(tmp_path: Path) -> Path:
    samples = [
        {"webp" if i % 2 else "png": image_bytes(colour(i), "WEBP" if i % 2 else "PNG"), "cls": str(i % 3).encode()}
        for i in range(7)
    ]
    return write_wds(tmp_path / "wds_tiny", "test", samples, per_shard=3, classnames=CLASSNAMES, templates=TEMPLATES)


def test_wds_classification_matches_clip_benchmark_reader(wds_classification: Path):
    ours = load_wds(str(wds_classification))
    theirs = clip_benchmark_wds(wds_classification)
    pairs = list(theirs)
    assert (ours.name, ours.classnames, ours.templates) == ("tiny", theirs.classes, theirs.templates)
    np.testing.assert_array_equal(ours.labels, [label for _, label in pairs])
    np.testing.assert_array_equal(ours.labels, [i % 3 for i in range(7)])  # three shards, in order
    for ref, (image, _) in zip(ours.images, pairs, strict=True):
        np.testing.assert_array_equal(decode(read_image(ref)), image)


def test_wds_multilabel(tmp_path: Path):
    vectors = [np.array([1, 0, 1]), np.array([0, 1, 0])]
    samples = []
    for i, vector in enumerate(vectors):
        buf = io.BytesIO()
        np.save(buf, vector)
        samples.append({"jpg": image_bytes(colour(i), "JPEG"), "npy": buf.getvalue()})
    root = write_wds(
        tmp_path / "wds_voc2007_multilabel",
        "test",
        samples,
        per_shard=5,
        dataset_type="multilabel",
        classnames=CLASSNAMES,
        templates=TEMPLATES,
    )
    ours = load_wds(str(root))
    assert ours.multilabel and ours.name == "voc2007_multilabel"
    np.testing.assert_array_equal(ours.labels, np.stack(vectors))
    np.testing.assert_array_equal(ours.labels, np.stack([label for _, label in clip_benchmark_wds(root)]))


def test_wds_retrieval_matches_clip_benchmark_reader(tmp_path: Path):
    groups = [["a dog.", "a brown dog"], ["two cats", "cats on a sofa", "a sofa"], ["a bus"]]
    samples = [{"jpg": image_bytes(colour(i), "JPEG"), "txt": "\n".join(g).encode()} for i, g in enumerate(groups)]
    root = write_wds(tmp_path / "wds_flickr8k", "test", samples, per_shard=2, dataset_type="retrieval")
    ours = load_wds(str(root))
    theirs = [captions for _, captions in clip_benchmark_wds(root)]
    assert ours.caption_groups() == theirs == groups
    assert ours.protocol == "clip_benchmark-wds-test"
    np.testing.assert_array_equal(ours.text_to_image, [0, 0, 1, 1, 1, 2])


def test_wds_train_split_and_missing_split(wds_classification: Path):
    with pytest.raises(FileNotFoundError, match="nshards.txt"):
        load_wds(str(wds_classification), split="train")


def test_wds_labels_must_fit_classnames(wds_classification: Path):
    (wds_classification / "classnames.txt").write_text("apple\nbear\n")
    with pytest.raises(ValueError, match="labels do not fit"):
        load_wds(str(wds_classification))


# ---------------------------------------------------------------- ImageNet-A: a subset of the 1000 classes


def test_imagenet_a_folder_matches_clip_benchmark_masking(tmp_path: Path):
    from clip_benchmark.datasets import builder

    imagenet_names = json.loads((Path(builder.__file__).parent / "en_classnames.json").read_text())["imagenet1k"]
    wnids = builder.all_imagenet_wordnet_ids
    root = tmp_path / "imagenet-a"
    # ImageNet-A ships 200 WordNet-id folders; write them all (one tiny image each), 2 in the last.
    subset = [w for i, w in enumerate(wnids) if i % 5 == 1][:200]
    for index, wnid in enumerate(subset):
        write_image(root / wnid / f"{index}.png", colour(index))
    write_image(root / subset[-1] / "extra.png")
    (root / "classnames.txt").write_text("\n".join(imagenet_names) + "\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "templates.txt").write_text("a photo of a {c}.\n")
    ours = load_image_folder(str(root))
    assert ours.n_classes == 200
    assert ours.classnames == [name for name, w in zip(imagenet_names, wnids) if w in set(subset)]
    # torchvision's ImageFolder (what CLIP_benchmark reads imagenet-a with) labels the same way.
    from torchvision.datasets import ImageFolder

    np.testing.assert_array_equal(ours.labels, ImageFolder(str(root)).targets)


def test_class_subset_needs_known_ids(tmp_path: Path):
    write_image(tmp_path / "n99" / "a.png")
    (tmp_path / "classnames.txt").write_text("x\ny\n")
    (tmp_path / "wnids.txt").write_text("n01\nn02\n")
    (tmp_path / "templates.txt").write_text("{c}\n")
    with pytest.raises(ValueError, match="n99"):
        load_image_folder(str(tmp_path))


def test_image_folder_split_subfolder(tmp_path: Path):
    (tmp_path / "classnames.txt").write_text("x\ny\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {c}\n")  # CLIP_benchmark's name
    for split in ("train", "test"):
        write_image(tmp_path / split / "0" / "a.png")
        write_image(tmp_path / split / "1" / "b.png")
    write_image(tmp_path / "train" / "1" / "c.png")
    train = load_image_folder(str(tmp_path), split="train", name="xy")
    np.testing.assert_array_equal(train.labels, [0, 1, 1])
    assert train.templates == ["a {c}"] and train.name == "xy"


# ---------------------------------------------------------------- COCO val2017 and Flickr30k whole set


def test_coco_captions_val2017(tmp_path: Path):
    (tmp_path / "annotations").mkdir()
    images = [{"id": 42, "file_name": "000000000042.jpg"}, {"id": 7, "file_name": "000000000007.jpg"}]
    annotations = [{"image_id": 42, "id": 1, "caption": f"forty-two {i} "} for i in range(6)]
    annotations += [{"image_id": 7, "id": 9, "caption": "seven a"}, {"image_id": 7, "id": 3, "caption": "seven b"}]
    (tmp_path / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": images, "annotations": annotations})
    )
    for image in images:
        write_image(tmp_path / "val2017" / image["file_name"])
    dataset = load_coco_captions(str(tmp_path / "annotations" / "captions_val2017.json"))
    assert dataset.images == [
        str(tmp_path / "val2017" / "000000000007.jpg"),
        str(tmp_path / "val2017" / "000000000042.jpg"),
    ]  # by image id
    assert dataset.caption_groups() == [["seven a", "seven b"], [f"forty-two {i}" for i in range(5)]]
    assert dataset.protocol == "coco-val2017-first5"


def test_flickr30k_token_file(tmp_path: Path):
    lines = [
        "1000092795.jpg#0\tTwo young guys .",
        "1000092795.jpg#1\tTwo men outside .",
        "10002456.jpg#0\tSeveral men .",
        "",
        "1000092795.jpg#2\tA third caption .",
    ]
    (tmp_path / "results_20130124.token").write_text("\n".join(lines) + "\n")
    for name in ("1000092795.jpg", "10002456.jpg"):
        write_image(tmp_path / "flickr30k-images" / name)
    dataset = load_flickr_token(str(tmp_path / "results_20130124.token"))
    assert [Path(p).name for p in dataset.images] == ["1000092795.jpg", "10002456.jpg"]
    assert dataset.caption_groups() == [
        ["Two young guys .", "Two men outside .", "A third caption ."],
        ["Several men ."],
    ]
    assert dataset.protocol == "flickr30k-full"
    (tmp_path / "results_20130124.token").write_text("garbage line\n")
    with pytest.raises(ValueError, match="line 1"):
        load_flickr_token(str(tmp_path / "results_20130124.token"))


# ---------------------------------------------------------------- ShareGPT4V-style shard build


def write_long_caption_build(root: Path, n: int, per_shard: int) -> str:
    """A build in the pipelines/shards.py format: samples with a caption group holding a long caption."""
    fs, path = storage.open_storage(str(root))
    rows = [
        {
            shards.KEY: f"{i:06d}",
            shards.IMAGE: image_bytes(colour(i), "JPEG"),
            shards.EDGE: image_bytes((0, 0, 0)),
            shards.META: json.dumps(
                {
                    "source": f"sa_{i}.jpg",
                    "width": 8,
                    "height": 6,
                    "captions": [
                        {"text": f"short {i}", "kind": shards.CAPTION_SHORT},
                        {"text": f"a long detailed description of image {i}", "kind": shards.CAPTION_LONG},
                    ],
                }
            ),
        }
        for i in range(n)
    ]
    entries = [
        shards.write_shard(fs, path, s, rows[s * per_shard : (s + 1) * per_shard])
        for s in range((n + per_shard - 1) // per_shard)
    ]
    shards.write_manifest(fs, path, {"shards": entries, "counts": {"samples": n}})
    return str(root)


def test_long_caption_build(tmp_path: Path):
    uri = write_long_caption_build(tmp_path / "sharegpt4v" / "val1k", n=7, per_shard=3)
    dataset = load_long_caption_build(uri, limit=5)
    assert dataset.n_images == 5 and dataset.name == "val1k" and dataset.protocol == "long-caption"
    assert dataset.captions == [f"a long detailed description of image {i}" for i in range(5)]
    np.testing.assert_array_equal(dataset.text_to_image, np.arange(5))
    np.testing.assert_array_equal(decode(dataset.images[4]), decode(image_bytes(colour(4), "JPEG")))
    assert load_long_caption_build(uri).n_images == 7


def test_long_caption_build_without_manifest(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_long_caption_build(str(tmp_path / "nothing"))


# ---------------------------------------------------------------- SugarCrepe


def write_sugarcrepe(root: Path) -> Path:
    for s_index, subset in enumerate(SUGARCREPE_SUBSETS):
        entries = {
            str(10 * k + s_index): {
                "filename": f"0000000{k}.jpg",
                "caption": f"{subset} true {k}",
                "negative_caption": f"{subset} false {k}",
            }
            for k in (3, 1)
        }
        (root / f"{subset}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{subset}.json").write_text(json.dumps(entries))
    for k in (1, 3):
        write_image(root / "val2017" / f"0000000{k}.jpg", colour(k))
    return root


def test_sugarcrepe_matches_clip_benchmark_reader(tmp_path: Path):
    from clip_benchmark.datasets.sugar_crepe import SugarCrepe

    root = write_sugarcrepe(tmp_path / "sugar_crepe")
    dataset = load_sugarcrepe(str(root))
    assert list(dataset.subsets) == list(SUGARCREPE_SUBSETS)
    for subset, pairs in dataset.subsets.items():
        theirs = SugarCrepe(str(root / "val2017"), str(root / f"{subset}.json"), transform=np.asarray)
        assert [list(texts) for _, texts in theirs] == [[p, n] for p, n in zip(pairs.positives, pairs.negatives)]
        for ref, (image, _) in zip(pairs.images, theirs, strict=True):
            np.testing.assert_array_equal(decode(read_image(ref)), image)


def test_sugarcrepe_names_missing_files(tmp_path: Path):
    root = write_sugarcrepe(tmp_path / "sugar_crepe")
    (root / "swap_att.json").unlink()
    with pytest.raises(FileNotFoundError, match="swap_att.json"):
        load_sugarcrepe(str(root))


# ---------------------------------------------------------------- S3 (moto server on loopback)


@pytest.fixture
def s3_bucket(monkeypatch):
    from moto.server import ThreadedMotoServer

    from tests.conftest import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("bench")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_readers_take_s3_uris(s3_bucket, tmp_path: Path, wds_classification: Path):
    local = write_sugarcrepe(tmp_path / "sugar_crepe")
    s3_bucket.put(str(local), "bench/sugar_crepe", recursive=True)
    s3_bucket.put(str(wds_classification), "bench/wds_tiny", recursive=True)
    dataset = load_sugarcrepe("s3://bench/sugar_crepe")
    assert dataset.subsets["add_att"].images == [
        "s3://bench/sugar_crepe/val2017/00000003.jpg",
        "s3://bench/sugar_crepe/val2017/00000001.jpg",
    ]
    np.testing.assert_array_equal(
        decode(read_image(dataset.subsets["add_att"].images[1])), decode(image_bytes(colour(1), "JPEG"))
    )
    from_s3, from_disk = load_wds("s3://bench/wds_tiny"), load_wds(str(wds_classification))
    assert from_s3.images[4].startswith("s3://bench/wds_tiny/test/1.tar::bytes=")
    assert [read_image(r) for r in from_s3.images] == [read_image(r) for r in from_disk.images]
    assert from_s3.classnames == CLASSNAMES


def test_wds_images_are_byte_ranges_of_their_shards(wds_classification: Path):
    dataset = load_wds(str(wds_classification))
    uri, _, span = dataset.images[0].rpartition("::bytes=")
    assert uri == str(wds_classification / "test" / "0.tar")
    offset, size = (int(x) for x in span.split("+"))
    assert read_image(dataset.images[0]) == (wds_classification / "test" / "0.tar").read_bytes()[offset : offset + size]
    data = (wds_classification / "test" / "2.tar").read_bytes()
    (wds_classification / "test" / "2.tar").write_bytes(data[:520])  # rewritten after listing
    with pytest.raises(ValueError, match="changed"):
        read_image(dataset.images[-1])
