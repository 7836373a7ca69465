"""The report's pictures and the attribute split of zero-shot accuracy: colour/shape accuracies
worked out by hand on a 2 x 3 attribute grid, class_attributes.json read with the image folder,
the retrieval gallery's top captions, and the PNGs written and linked from report.md for a run
with and without metrics.jsonl."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.task_registry import Benchmark, score
from scoring.sets.classification import ClassificationSet, load_image_folder
from scoring.retrieval import select_gallery
from scoring.zeroshot import compute_attribute_accuracy
from training.methods.topology.spaces import Sphere

# 2 colours x 3 shapes, colour-major as the demo: class i = colour i // 3, shape i % 3.
CLASSES = ["red circle", "red square", "red star", "blue circle", "blue square", "blue star"]
ATTRIBUTES = {"colour": [c.split()[0] for c in CLASSES], "shape": [c.split()[1] for c in CLASSES]}
# image: (true class, top-1 class)  colour right? shape right?
HAND = [
    (0, 0),  # red circle  -> red circle    yes  yes
    (1, 2),  # red square  -> red star      yes  no
    (2, 0),  # red star    -> red circle    yes  no
    (3, 4),  # blue circle -> blue square   yes  no
    (4, 1),
]  # blue square -> red square    no   yes
# colour 4/5; shape 2/5; shape among the 4 with the right colour: 1/4; colour among the 2 with
# the right shape: 1/2; top-1 (both right) 1/5.
HAND_EXPECTED = {"colour": 0.8, "shape": 0.4, "shape_given_colour": 0.25, "colour_given_shape": 0.5}


def hand_benchmark() -> tuple[Benchmark, dict]:
    """One template per class; class c's prompt embeds as e_c and image n as e_(its top-1 class),
    so the cosine logits are one-hot at the chosen prediction."""
    labels = np.array([t for t, _ in HAND])
    dataset = ClassificationSet(
        "grid", [f"img{i}.png" for i in range(len(HAND))], labels, CLASSES, ["a {c}."], ATTRIBUTES
    )
    eye = np.eye(len(CLASSES))
    return Benchmark("grid", "zeroshot", {"test": dataset}), {"images": eye[[p for _, p in HAND]], "prompts": eye}


def test_attribute_accuracies_by_hand():
    bench, features = hand_benchmark()
    entry = score(bench, features, Sphere(1))
    assert entry["top1"] == pytest.approx(0.2)
    assert entry["attribute_accuracy"] == pytest.approx(HAND_EXPECTED)
    counts = np.array(entry["confusion"]["counts"])
    assert counts.sum() == 5 and counts[1, 2] == counts[4, 1] == counts[0, 0] == 1 and np.trace(counts) == 1
    assert entry["confusion"]["attributes"] == ATTRIBUTES and entry["confusion"]["classnames"] == CLASSES


def test_given_accuracy_is_none_when_no_image_has_that_attribute_right():
    accuracy = compute_attribute_accuracy(
        np.array([1]), np.array([0]), {"colour": ["red", "blue"], "shape": ["circle", "circle"]}
    )
    assert accuracy == {"colour": 0.0, "shape": 1.0, "shape_given_colour": None, "colour_given_shape": 0.0}


def png_bytes(colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_grid_folder(root: Path, attributes: dict | None) -> Path:
    for c in range(len(CLASSES)):
        (root / f"{c:03d}").mkdir(parents=True)
        (root / f"{c:03d}" / "0.png").write_bytes(png_bytes())
    (root / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "templates.txt").write_text("a {c}.\n")
    if attributes is not None:
        (root / "class_attributes.json").write_text(json.dumps(attributes))
    return root


def test_image_folder_reads_optional_class_attributes(tmp_path: Path):
    assert load_image_folder(str(write_grid_folder(tmp_path / "with", ATTRIBUTES))).attributes == ATTRIBUTES
    assert load_image_folder(str(write_grid_folder(tmp_path / "without", None))).attributes == {}
    with pytest.raises(ValueError, match="one value per class"):
        load_image_folder(str(write_grid_folder(tmp_path / "short", {"colour": ["red"]})))


def test_gallery_lists_each_query_top_captions_with_matches_marked():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # image 0 owns captions 0, 1
            [0.3, 0.8, 0.7, 0.6],
        ]
    )  # image 1 owns captions 2, 3
    gallery = select_gallery(scores, np.array([0, 0, 1, 1]), n_queries=2, top=3)
    assert gallery == [
        (0, [(0, 0.9, True), (2, 0.5, False), (3, 0.2, False)]),
        (1, [(1, 0.8, False), (2, 0.7, True), (3, 0.6, True)]),
    ]


def tiny_report(run: Path, image: Path) -> dict:
    bench, features = hand_benchmark()
    gallery = [
        {
            "image": str(image),
            "caption": "a red circle",
            "top": [
                {"text": "a red circle", "correct": True, "score": 0.31},
                {"text": "a blue star on a long long line " * 8, "correct": False, "score": 0.2},
            ],
        },
        {"image": None, "caption": "held in a shard", "top": [{"text": "x", "correct": False, "score": 0.1}]},
    ]
    return {
        "checkpoint": {"path": str(run), "resolved": str(run / "step_00000004"), "step": 4, "method": "flip"},
        "zeroshot": {"grid": score(bench, features, Sphere(1))},
        "retrieval": {
            "tiny": {
                "protocol": "karpathy-test",
                "n_images": 2,
                "n_texts": 3,
                "text_retrieval_recall@1": 0.5,
                "image_retrieval_recall@1": 0.5,
                "gallery": gallery,
            }
        },
    }


def published_pngs(out: Path) -> tuple[set[str], set[str]]:
    """(PNG files in `out`, each a valid PNG; the images report.md links)."""
    files = {p.name for p in out.glob("*.png")}
    for name in files:
        assert (out / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        Image.open(out / name).verify()
    return files, set(re.findall(r"!\[[^]]+\]\(([^)]+\.png)\)", (out / "report.md").read_text()))


@pytest.mark.parametrize("with_metrics", [True, False])
def test_publish_report_writes_and_links_every_png(tmp_path: Path, with_metrics: bool):
    from evaluation.evaluate import publish_report

    run = tmp_path / "runs" / "demo-flip"
    (run / "step_00000004").mkdir(parents=True)
    if with_metrics:
        rows = [
            {
                "step": s,
                "loss/total": 5.0 - s,
                "loss/contrastive": 5.0 - s,
                "temperature": 0.07,
                "lr": 1e-3 * s,
                "samples_per_s": 80.0,
                "data_wait_fraction": 0.1,
                "grad_norm": 2.0,
                **({"eval/grid/top1": 0.1 * s, "eval/tiny/image_retrieval_recall@1": 0.05 * s} if s % 2 == 0 else {}),
            }
            for s in (1, 2, 3, 4)
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "q.png").write_bytes(png_bytes())
    publish_report(tiny_report(run, tmp_path / "q.png"), str(tmp_path / "report"))
    files, linked = published_pngs(tmp_path / "report")
    assert files == linked
    assert {"plot_confusion_grid.png", "plot_gallery_tiny.png", "plot_zeroshot.png", "plot_retrieval.png"} <= files
    assert ("plot_training_curves.png" in files) == with_metrics
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| grid | 80.0 | 40.0 | 25.0 | 50.0 |" in markdown
