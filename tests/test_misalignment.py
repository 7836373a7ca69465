"""The report's intra-modal misalignment view: inverted entries paired with the native entry on
the same data, the expected direction per task, the section and its plot."""

from __future__ import annotations

from evaluation.misalignment import misalignment_rows
from evaluation.plots import write_plots
from evaluation.report import format_report_markdown

SPEC_PETS = {"test": {"format": "wds", "path": "/d/pets", "split": "test"}}
SPEC_COCO = {"test": {"format": "karpathy", "path": "/d/coco.json"}}
REPORT = {
    "checkpoint": {"path": "runs/x", "step": 3, "method": "clip"},
    "intra_modal": {
        "pets": {"mAP": 0.30},
        "pets-oti": {"mAP": 0.36, "query": "oti"},
        "coco": {"mAP": 0.40},
        "coco-ovi": {"mAP": 0.38, "query": "ovi"},
    },
    "zeroshot": {
        "pets-zs": {"top1": 0.60},
        "pets-zs-oti": {"top1": 0.50, "query": "oti"},
        "orphan-oti": {"top1": 0.1, "query": "oti"},
    },
    "retrieval": {
        "coco-r": {"text_retrieval_recall@1": 0.5, "image_retrieval_recall@1": 0.4},
        "coco-r-ovi": {"text_retrieval_recall@1": 0.5, "image_retrieval_recall@1": 0.2, "query": "ovi"},
    },
    "datasets": {
        "pets": {"task": "image_retrieval", "specs": SPEC_PETS},
        "pets-oti": {"task": "image_retrieval", "specs": SPEC_PETS},
        "coco": {"task": "text_retrieval", "specs": SPEC_COCO},
        "coco-ovi": {"task": "text_retrieval", "specs": SPEC_COCO},
        "pets-zs": {"task": "zeroshot", "specs": SPEC_PETS},
        "pets-zs-oti": {"task": "zeroshot", "specs": SPEC_PETS},
        "orphan-oti": {"task": "zeroshot", "specs": {"test": {"path": "/elsewhere"}}},
        "coco-r": {"task": "retrieval", "specs": SPEC_COCO},
        "coco-r-ovi": {"task": "retrieval", "specs": SPEC_COCO},
    },
}


def test_rows_pair_inverted_entries_with_their_native_twin():
    rows = {r["name"]: r for r in misalignment_rows(REPORT)}
    assert set(rows) == {"pets-oti", "coco-ovi", "pets-zs-oti", "coco-r-ovi"}  # the orphan has no twin
    assert rows["pets-oti"]["native_name"] == "pets" and rows["pets-oti"]["as_expected"]  # intra-modal gains
    assert not rows["coco-ovi"]["as_expected"]  # text->text lost: flagged
    assert rows["pets-zs-oti"]["as_expected"] and rows["pets-zs-oti"]["expected_sign"] == -1
    assert rows["coco-r-ovi"]["metric"] == "T→I R@1" and rows["coco-r-ovi"]["native"] == 0.4


def test_section_and_plot_are_written(tmp_path):
    markdown = format_report_markdown(REPORT, ["plot_misalignment.png"])
    assert "## Intra-modal misalignment" in markdown
    assert "| pets-oti | pets | mAP (oti) | 30.0 | 36.0 | +6.0 | gain ✓ |" in markdown
    assert "| coco-ovi | coco | mAP (ovi) | 40.0 | 38.0 | -2.0 | gain ✗ |" in markdown
    assert "](plot_misalignment.png)" in markdown
    written = [p.name for p in write_plots(REPORT, tmp_path)]
    assert "plot_misalignment.png" in written and (tmp_path / "plot_misalignment.png").stat().st_size > 0
    plain = {k: v for k, v in REPORT.items() if k not in ("intra_modal", "zeroshot", "retrieval")}
    assert "misalignment" not in format_report_markdown(plain)
