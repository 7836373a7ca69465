"""The evaluation report: JSON round trip and the Markdown tables with the numbers in percent."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from evaluation.report import format_report_markdown, write_report

SAMPLE_REPORT = {
    "checkpoint": {
        "path": "runs/pgs-b16/checkpoint_000400",
        "step": 400,
        "method": "pgs",
        "manifest_digests": ["sha256:aaa111", "sha256:bbb222"],
        "arch": "ViT-B-16",  # extra fields travel in the JSON only
    },
    "zeroshot": {
        "imagenet1k": {"top1": 0.68374, "top5": 0.91049, "mean_per_class_recall": 0.68371,
                       "n_images": 50000, "n_classes": 1000},
        "cifar10": {"top1": 0.9, "top5": 0.99951, "mean_per_class_recall": 0.89949,
                    "n_images": 10000, "n_classes": 10},
    },
    "retrieval": {
        "mscoco": {"protocol": "karpathy-test", "n_images": 5000, "n_texts": 25014,
                   "text_retrieval_recall@1": 0.5242, "text_retrieval_recall@5": 0.7681,
                   "text_retrieval_recall@10": 0.8472,
                   "image_retrieval_recall@1": 0.33096, "image_retrieval_recall@5": 0.58404,
                   "image_retrieval_recall@10": 0.69},
    },
    "skipped": {"urban1k": "no data at /data/Urban1k"},
}


def test_write_report_round_trips_json(tmp_path: Path):
    json_path, md_path = write_report(SAMPLE_REPORT, tmp_path / "eval" / "step400")
    assert (json_path.name, md_path.name) == ("report.json", "report.md")
    text = json_path.read_text()
    assert json.loads(text) == SAMPLE_REPORT
    assert text == json.dumps(SAMPLE_REPORT, sort_keys=True, indent=2) + "\n"
    # The tables are sorted by dataset, so the JSON renders to the very same Markdown.
    assert md_path.read_text() == format_report_markdown(json.loads(text))


def test_markdown_header_names_the_checkpoint():
    markdown = format_report_markdown(SAMPLE_REPORT)
    assert markdown.startswith("# Evaluation report\n")
    assert "- Checkpoint: `runs/pgs-b16/checkpoint_000400`" in markdown
    assert "- Step: 400" in markdown
    assert "- Method: pgs" in markdown
    assert "- Data manifest digest(s): `sha256:aaa111`, `sha256:bbb222`" in markdown


def test_markdown_zeroshot_table():
    lines = format_report_markdown(SAMPLE_REPORT).splitlines()
    start = lines.index("## Zero-shot classification")
    assert lines[start + 2 : start + 6] == [
        "| dataset | top-1 | top-5 | mean per-class recall |",
        "| --- | ---: | ---: | ---: |",
        "| cifar10 | 90.0 | 100.0 | 89.9 |",
        "| imagenet1k | 68.4 | 91.0 | 68.4 |",
    ]


def test_markdown_retrieval_table_in_paper_layout():
    lines = format_report_markdown(SAMPLE_REPORT).splitlines()
    start = lines.index("## Retrieval")
    assert lines[start + 2 : start + 5] == [
        "| dataset | protocol | Image→Text R@1 | R@5 | R@10 | Text→Image R@1 | R@5 | R@10 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        "| mscoco | karpathy-test | 52.4 | 76.8 | 84.7 | 33.1 | 58.4 | 69.0 |",
    ]


def test_markdown_skipped_section():
    markdown = format_report_markdown(SAMPLE_REPORT)
    assert markdown.endswith("## Skipped\n\n- urban1k: no data at /data/Urban1k\n")


def test_markdown_empty_sections_and_missing_values():
    report = {"checkpoint": {"manifest_digests": "sha256:ccc"},
              "zeroshot": {"pets": {"top1": 0.5, "top5": float("nan"), "mean_per_class_recall": 0.25}}}
    markdown = format_report_markdown(report)
    assert "- Checkpoint: –" in markdown and "- Data manifest digest(s): `sha256:ccc`" in markdown
    assert "| pets | 50.0 | – | 25.0 |" in markdown
    assert "## Retrieval\n\nNone." in markdown and "## Skipped\n\nNone." in markdown


def test_write_report_accepts_numpy_scalars(tmp_path: Path):
    report = {"zeroshot": {"pets": {"top1": np.float32(0.5), "top5": np.float64(0.75),
                                    "mean_per_class_recall": 0.5, "n_images": np.int64(8), "n_classes": 4}}}
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["zeroshot"]["pets"]["n_images"] == 8
    assert "| pets | 50.0 | 75.0 | 50.0 |" in md_path.read_text()
