"""The evaluation report: one dict (schema below) written as `report.json` and rendered as
`report.md` with paper-style tables of zero-shot accuracy and retrieval recall."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypedDict

from evaluation.tasks.retrieval import IMAGE_RETRIEVAL_KEY, RECALL_KS, TEXT_RETRIEVAL_KEY
from evaluation.tasks.zeroshot import MEAN_PER_CLASS_RECALL_KEY, TOPK_KEY

REPORT_JSON = "report.json"
REPORT_MD = "report.md"

# Top-level sections of a report dict.
CHECKPOINT_KEY = "checkpoint"
ZEROSHOT_KEY = "zeroshot"
RETRIEVAL_KEY = "retrieval"
SKIPPED_KEY = "skipped"

# Fields of the checkpoint section shown in the Markdown header (others stay in the JSON only).
CHECKPOINT_PATH_KEY = "path"
CHECKPOINT_STEP_KEY = "step"
CHECKPOINT_METHOD_KEY = "method"
MANIFEST_DIGESTS_KEY = "manifest_digests"  # one digest per data manifest the checkpoint read

# Per-dataset fields; metric names are those evaluation.tasks returns (CLIP_benchmark's names).
N_IMAGES_KEY = "n_images"
N_CLASSES_KEY = "n_classes"
N_TEXTS_KEY = "n_texts"
PROTOCOL_KEY = "protocol"
ZEROSHOT_COLUMNS = {
    "top-1": TOPK_KEY.format(k=1),
    "top-5": TOPK_KEY.format(k=5),
    "mean per-class recall": MEAN_PER_CLASS_RECALL_KEY,
}
IMAGE_TO_TEXT_KEY = TEXT_RETRIEVAL_KEY  # image query, captions retrieved
TEXT_TO_IMAGE_KEY = IMAGE_RETRIEVAL_KEY  # caption query, images retrieved
MISSING = "–"


class CheckpointInfo(TypedDict, total=False):
    path: str
    step: int
    method: str
    manifest_digests: list[str]


class ZeroshotEntry(TypedDict):
    top1: float  # fractions in [0, 1]; the Markdown shows percentages
    top5: float
    mean_per_class_recall: float
    n_images: int
    n_classes: int


# Keys with "@" need the functional TypedDict form; spelled out so type checkers read them.
RetrievalEntry = TypedDict(
    "RetrievalEntry",
    {
        "protocol": str,  # e.g. "karpathy-test", "long-caption"
        "n_images": int,
        "n_texts": int,
        "text_retrieval_recall@1": float,  # image -> text
        "text_retrieval_recall@5": float,
        "text_retrieval_recall@10": float,
        "image_retrieval_recall@1": float,  # text -> image
        "image_retrieval_recall@5": float,
        "image_retrieval_recall@10": float,
    },
)


class Report(TypedDict):
    checkpoint: CheckpointInfo
    zeroshot: dict[str, ZeroshotEntry]
    retrieval: dict[str, RetrievalEntry]
    skipped: dict[str, str]  # dataset name -> why it was not evaluated


def format_percent(value: Any) -> str:
    """A fraction as a percentage with one decimal; absent or NaN shows as a dash."""
    if value is None or math.isnan(float(value)):
        return MISSING
    return f"{100 * float(value):.1f}"


def format_table(header: list[str], rows: list[list[str]], n_text_columns: int) -> list[str]:
    """Markdown table lines; columns after the first `n_text_columns` are numbers, right-aligned."""
    align = ["---"] * n_text_columns + ["---:"] * (len(header) - n_text_columns)
    return ["| " + " | ".join(cells) + " |" for cells in (header, align, *rows)]


def format_header(checkpoint: dict) -> list[str]:
    """Title and the checkpoint's identity: path, step, method and data manifest digest(s)."""
    digests = checkpoint.get(MANIFEST_DIGESTS_KEY) or []
    digests = [digests] if isinstance(digests, str) else digests
    path = checkpoint.get(CHECKPOINT_PATH_KEY)
    return [
        "# Evaluation report",
        "",
        f"- Checkpoint: {f'`{path}`' if path else MISSING}",
        f"- Step: {checkpoint.get(CHECKPOINT_STEP_KEY, MISSING)}",
        f"- Method: {checkpoint.get(CHECKPOINT_METHOD_KEY, MISSING)}",
        f"- Data manifest digest(s): {', '.join(f'`{d}`' for d in digests) or MISSING}",
    ]


def format_zeroshot_section(zeroshot: dict[str, dict]) -> list[str]:
    """One row per dataset, sorted by name so the JSON round trip renders identically."""
    lines = ["## Zero-shot classification", ""]
    if not zeroshot:
        return lines + ["None."]
    rows = [[name] + [format_percent(entry.get(key)) for key in ZEROSHOT_COLUMNS.values()]
            for name, entry in sorted(zeroshot.items())]
    return lines + format_table(["dataset", *ZEROSHOT_COLUMNS], rows, n_text_columns=1)


def format_retrieval_section(retrieval: dict[str, dict]) -> list[str]:
    """Papers' layout: Image→Text R@1/5/10 then Text→Image R@1/5/10, per dataset and protocol."""
    lines = ["## Retrieval", ""]
    if not retrieval:
        return lines + ["None."]
    recall_headers = [f"R@{k}" for k in RECALL_KS]
    header = ["dataset", "protocol", f"Image→Text {recall_headers[0]}", *recall_headers[1:],
              f"Text→Image {recall_headers[0]}", *recall_headers[1:]]
    keys = [IMAGE_TO_TEXT_KEY.format(k=k) for k in RECALL_KS] + [TEXT_TO_IMAGE_KEY.format(k=k) for k in RECALL_KS]
    rows = [[name, str(entry.get(PROTOCOL_KEY, MISSING))] + [format_percent(entry.get(key)) for key in keys]
            for name, entry in sorted(retrieval.items())]
    return lines + format_table(header, rows, n_text_columns=2)


def format_skipped_section(skipped: dict[str, str]) -> list[str]:
    lines = ["## Skipped", ""]
    return lines + ([f"- {name}: {reason}" for name, reason in sorted(skipped.items())] or ["None."])


def format_report_markdown(report: dict) -> str:
    """The whole report as Markdown: header, zero-shot table, retrieval table, skipped datasets."""
    sections = [
        format_header(report.get(CHECKPOINT_KEY, {})),
        format_zeroshot_section(report.get(ZEROSHOT_KEY, {})),
        format_retrieval_section(report.get(RETRIEVAL_KEY, {})),
        format_skipped_section(report.get(SKIPPED_KEY, {})),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def convert_numpy_scalar(value: Any) -> Any:
    """json.dump fallback: NumPy scalars (np.int64 counts, np.float32 metrics) as Python numbers."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `report.json` (sorted keys, indent 2) and `report.md` into `out_dir`; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / REPORT_JSON, out_dir / REPORT_MD
    json_path.write_text(json.dumps(report, sort_keys=True, indent=2, default=convert_numpy_scalar) + "\n",
                         encoding="utf-8")
    md_path.write_text(format_report_markdown(report), encoding="utf-8")
    return json_path, md_path
