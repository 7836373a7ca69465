"""CUB-200-2011 and Stanford Online Products readers on folders in their published layouts,
written here, and their Cross the Gap entries (same split, each query removed from its own
gallery) through the scorer and the crossgap suite."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from evaluation.task_registry import load_benchmark, requests, score
from evaluation.datasets.metric_learning import load_cub, load_sop
from evaluation.tasks.intra_modal import compute_retrieval_metrics
from training.methods.topology.spaces import Sphere

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def write_image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((8, 8, 3), 90, np.uint8))


def write_cub(root, ids=(3, 1, 2, 4, 5, 6)):
    """Six images, two per class, listed out of id order (the reader sorts by id); image 2k-1
    is a training image. Returns id -> (relative path, class index)."""
    truth = {}
    for i in ids:
        label = (i - 1) // 2
        rel = f"{CUB_CLASSES[label]}/{CUB_CLASSES[label].split('.')[1]}_{i:04d}_{i}.jpg"
        write_image(root / "images" / rel)
        truth[i] = (rel, label)
    (root / "images.txt").write_text("".join(f"{i} {truth[i][0]}\n" for i in ids))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {truth[i][1] + 1}\n" for i in ids))
    (root / "classes.txt").write_text("".join(f"{n + 1} {c}\n" for n, c in enumerate(CUB_CLASSES)))
    (root / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in ids))
    return truth


def write_sop(root):
    """Two super classes, three products; the test split's classes start at 11319 as published."""
    rows = {
        "train": [(1, 1, 1, "bicycle_final/111_0.JPG"), (2, 1, 1, "bicycle_final/111_1.JPG")],
        "test": [
            (3, 11319, 1, "bicycle_final/222_0.JPG"),
            (4, 11320, 2, "cabinet_final/333_0.JPG"),
            (5, 11319, 1, "bicycle_final/222_1.JPG"),
            (6, 11320, 2, "cabinet_final/333_1.JPG"),
        ],
    }
    for split, listing in rows.items():
        for row in listing:
            write_image(root / row[3])
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in listing]
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return rows


def test_cub_reads_every_image_in_id_order_with_its_class(tmp_path):
    truth = write_cub(tmp_path)
    data = load_cub(str(tmp_path))
    assert data.n_images == 6 and data.classnames == ["Black footed Albatross", "Laysan Albatross", "Sooty Albatross"]
    assert [ref.rsplit("/", 1)[-1] for ref in data.images] == [truth[i][0].rsplit("/", 1)[-1] for i in range(1, 7)]
    assert data.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_cub_official_split_and_errors(tmp_path):
    write_cub(tmp_path)
    assert load_cub(str(tmp_path), split="train").labels.tolist() == [0, 1, 2]  # odd ids train
    assert len(load_cub(str(tmp_path), split="test").images) == 3
    with pytest.raises(ValueError, match="split 'val'"):
        load_cub(str(tmp_path), split="val")
    (tmp_path / "image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(ValueError, match="image 2 has no label"):
        load_cub(str(tmp_path))


def test_cub_missing_image_is_named_before_encoding(tmp_path):
    truth = write_cub(tmp_path)
    (tmp_path / "images" / truth[4][0]).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 6 images"):
        load_cub(str(tmp_path))


def test_sop_reads_the_split_with_classes_in_first_appearance_order(tmp_path):
    write_sop(tmp_path)
    data = load_sop(str(tmp_path))
    assert data.labels.tolist() == [0, 1, 0, 1] and data.classnames == ["bicycle 11319", "cabinet 11320"]
    assert data.images[1].endswith("cabinet_final/333_0.JPG")
    assert load_sop(str(tmp_path), split="train").labels.tolist() == [0, 0]


def test_sop_refuses_a_listing_without_its_header(tmp_path):
    write_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").write_text("3 11319 1 bicycle_final/222_0.JPG\n")
    with pytest.raises(ValueError, match="header"):
        load_sop(str(tmp_path))


@pytest.mark.parametrize("fmt, writer", [("cub", write_cub), ("sop", write_sop)])
def test_same_split_entry_removes_each_query_from_its_gallery(tmp_path, fmt, writer):
    """The entry embeds the split once per side and scores it with the query removed: with
    features that put each image closest to itself, a scorer that kept the query would reach
    precision 1 at rank 1 for free."""
    writer(tmp_path)
    bench = load_benchmark(
        {
            "name": fmt,
            "task": "image_retrieval",
            "test": {"format": fmt, "path": str(tmp_path)},
            "options": {"gallery": "test"},
        }
    )
    wanted = requests(bench)
    assert set(wanted) == {"test", "gallery"} and wanted["test"] == wanted["gallery"]
    labels = bench.data["test"].labels
    rng = np.random.default_rng(0)
    features = rng.normal(size=(len(labels), 8))
    entry = score(bench, {"test": features, "gallery": features}, Sphere(8))
    ids = np.arange(len(labels))
    want = compute_retrieval_metrics(
        features, labels, features, labels, Sphere(8).score, query_ids=ids, gallery_ids=ids
    )
    assert entry["mAP"] == pytest.approx(want["mAP"]) and entry["n_gallery"] == len(labels) - 1
    assert "query removed" in entry["protocol"]
    kept = compute_retrieval_metrics(features, labels, features, labels, Sphere(8).score)
    assert kept["mAP"] > entry["mAP"]


def test_crossgap_suite_names_cub_sop_and_the_landmarks_native_and_oti():
    from evaluation.suites import suite_entries

    entries = {e["name"]: e for e in suite_entries("crossgap")}
    for name in ("cub", "sop"):
        assert entries[name]["options"] == {"gallery": "test"} and entries[name]["test"]["format"] == name
        assert entries[f"{name}-oti"]["options"]["query"] == "oti"
    assert entries["sop"]["test"]["split"] == "test" and entries["cub"]["test"]["split"] == "all"
    for name in ("roxford5k", "rparis6k"):
        assert entries[name]["task"] == entries[f"{name}-oti"]["task"] == "landmark_retrieval"
        assert entries[name]["test"] == {"format": "revisited", "path": f"/data/revisitop/{name}", "name": name}
