"""The evaluation report: JSON round trip and the Markdown tables with the numbers in percent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from evaluation.report import format_report_markdown, write_report

SAMPLE_REPORT = {
    "checkpoint": {
        "path": "runs/pgs-b16/checkpoint_000400",
        "step": 400,
        "method": "pgs",
        "manifest_digests": ["sha256:aaa111", "sha256:bbb222"],
        "data_weights": [0.7, 0.3],  # a mixture of two builds
        "arch": "ViT-B-16",  # extra fields travel in the JSON only
    },
    "zeroshot": {
        "imagenet1k": {
            "top1": 0.68374,
            "top5": 0.91049,
            "mean_per_class_recall": 0.68371,
            "n_images": 50000,
            "n_classes": 1000,
        },
        "cifar10": {"top1": 0.9, "top5": 0.99951, "mean_per_class_recall": 0.89949, "n_images": 10000, "n_classes": 10},
    },
    "retrieval": {
        "mscoco": {
            "protocol": "karpathy-test",
            "n_images": 5000,
            "n_texts": 25014,
            "text_retrieval_recall@1": 0.5242,
            "text_retrieval_recall@5": 0.7681,
            "text_retrieval_recall@10": 0.8472,
            "image_retrieval_recall@1": 0.33096,
            "image_retrieval_recall@5": 0.58404,
            "image_retrieval_recall@10": 0.69,
        },
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
    assert "- Data manifest digest(s): `sha256:aaa111` (weight 0.7), `sha256:bbb222` (weight 0.3)" in markdown


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
    report = {
        "checkpoint": {"manifest_digests": "sha256:ccc"},
        "zeroshot": {"pets": {"top1": 0.5, "top5": float("nan"), "mean_per_class_recall": 0.25}},
    }
    markdown = format_report_markdown(report)
    assert "- Checkpoint: –" in markdown and "- Data manifest digest(s): `sha256:ccc`" in markdown
    assert "| pets | 50.0 | – | 25.0 |" in markdown
    assert "## Retrieval\n\nNone." in markdown and "## Skipped\n\nNone." in markdown


def test_write_report_accepts_numpy_scalars(tmp_path: Path):
    report = {
        "zeroshot": {
            "pets": {
                "top1": np.float32(0.5),
                "top5": np.float64(0.75),
                "mean_per_class_recall": 0.5,
                "n_images": np.int64(8),
                "n_classes": 4,
            }
        }
    }
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["zeroshot"]["pets"]["n_images"] == 8
    assert "| pets | 50.0 | 75.0 | 50.0 |" in md_path.read_text()


FULL_REPORT = {
    **SAMPLE_REPORT,
    "zeroshot": {
        **SAMPLE_REPORT["zeroshot"],
        "voc2007_multilabel": {"mean_average_precision": 0.837, "n_images": 4952, "n_classes": 20},
    },
    "averages": {
        "smartclip9": {
            "mean": (0.68374 + 0.837) / 2,
            "datasets": ["imagenet1k", "voc2007_multilabel"],
            "missing": ["gtsrb"],
        }
    },
    "linear_probe": {
        "cifar10": {
            "top1": 0.912,
            "top5": 0.998,
            "mean_per_class_recall": 0.9119,
            "protocol": "adamw-lr0.1-bs64-ep10",
            "n_train": 50000,
            "n_test": 10000,
        }
    },
    "compositionality": {
        "sugarcrepe": {
            "replace_obj": 0.9,
            "replace_att": 0.8,
            "replace_rel": 0.7,
            "swap_obj": 0.6,
            "swap_att": 0.5,
            "add_obj": 0.4,
            "add_att": 0.3,
            "average_object": 0.6333,
            "average_attribute": 0.5333,
            "average_relation": 0.7,
            "average": 0.6,
        }
    },
    "intra_modal": {
        "dtd": {
            "mAP": 0.345,
            "protocol": "image->image, query test / gallery train",
            "mAP_by_alpha": {"0.25": 0.36, "0.5": 0.372},
        },
        "mscoco": {"mAP": 0.2, "mAP@R": 0.15, "R-precision": 0.25, "modality_gap": 0.8213, "protocol": "text->text"},
    },
}


def test_markdown_group_average_is_a_wide_row_with_missing_sets_named():
    lines = format_report_markdown(FULL_REPORT).splitlines()
    start = lines.index("### smartclip9 (top-1; mAP for multi-label)")
    assert lines[start + 2 : start + 7] == [
        "| imagenet1k | voc2007_multilabel | average |",
        "| ---: | ---: | ---: |",
        "| 68.4 | 83.7 | 76.0 |",
        "",
        "Average over 2 sets; missing: gtsrb.",
    ]
    assert "| voc2007_multilabel | – | – | – | 83.7 |" in lines  # the mAP column appears when needed


def test_markdown_linear_probe_sugarcrepe_and_intra_modal_tables():
    markdown = format_report_markdown(FULL_REPORT)
    assert "| cifar10 | adamw-lr0.1-bs64-ep10 | 91.2 | 99.8 | 91.2 |" in markdown
    assert (
        "| dataset | Replace obj | Replace att | Replace rel | Swap obj | Swap att | Add obj | Add att | "
        "avg object | avg attribute | avg relation | avg |"
    ) in markdown
    assert "| sugarcrepe | 90.0 | 80.0 | 70.0 | 60.0 | 50.0 | 40.0 | 30.0 | 63.3 | 53.3 | 70.0 | 60.0 |" in markdown
    assert "| dataset | protocol | mAP | mAP@R | R-precision | mAP at α (native weight) | modality gap |" in markdown
    assert "| dtd | image->image, query test / gallery train | 34.5 | – | – | 0.25: 36.0 · 0.5: 37.2 | – |" in markdown
    assert "| mscoco | text->text | 20.0 | 15.0 | 25.0 | – | 0.821 |" in markdown


def test_group_averages_name_missing_sets():
    from evaluation.report import add_group_averages

    report = {"zeroshot": {"a": {"top1": 0.5}, "m": {"mean_average_precision": 0.7}}}
    entries = [{"name": n, "task": "zeroshot", "groups": ["g"]} for n in ("a", "m", "gone")]
    entries.append({"name": "a", "task": "linear_probe", "groups": ["g"]})  # only zero-shot entries count
    add_group_averages(report, entries)
    assert report["averages"] == {"g": {"mean": pytest.approx(0.6), "datasets": ["a", "m"], "missing": ["gone"]}}


def test_plots_are_pngs_per_section_and_side_by_side(tmp_path: Path):
    from evaluation.plots import write_plots

    other = tmp_path / "other.json"
    other.write_text(json.dumps({**SAMPLE_REPORT, "checkpoint": {"method": "clip", "step": 9}}))
    paths = write_plots(FULL_REPORT, tmp_path / "plots", [str(other)])
    names = sorted(p.name for p in paths)
    assert "plot_compositionality.png" in names and "compare_zeroshot.png" in names
    assert "compare_linear_probe.png" in names  # present in one of the two reports
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)
