"""The evaluation report: one dict (schema below) written as `report.json` and rendered as
`report.md` with tables laid out like the papers' (zero-shot accuracy with group averages,
retrieval recall, linear probe, SugarCrepe, intra-modal mAP and the modality gap)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evaluation.datasets.compositional import SUGARCREPE_SUBSETS
from evaluation.tasks.compositionality import AVERAGE_KEY
from evaluation.misalignment import misalignment_rows
from evaluation.tasks.intra_modal import GAP_KEY, MAP_AT_R_KEY, MAP_KEY, R_PRECISION_KEY
from scoring.retrieval import IMAGE_RETRIEVAL_KEY, RECALL_KS, TEXT_RETRIEVAL_KEY
from scoring.zeroshot import ATTRIBUTE_ACCURACY_KEY, MEAN_AVERAGE_PRECISION_KEY, MEAN_PER_CLASS_RECALL_KEY, TOPK_KEY

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# The PNGs beside report.md (evaluation/plots.py writes them), with the caption report.md gives each.
BARS_FILE = "plot_{section}.png"
COMPARE_FILE = "compare_{section}.png"
CURVES_FILE = "plot_training_curves.png"
CONFUSION_FILE = "plot_confusion_{name}.png"
GALLERY_FILE = "plot_gallery_{name}.png"
MISALIGNMENT_FILE = "plot_misalignment.png"
FIGURE_CAPTIONS = [  # (file name pattern, caption), the first match wins
    (CURVES_FILE, "Training curves of the checkpoint's run"),
    (MISALIGNMENT_FILE, "Intra-modal misalignment: native against inverted queries"),
    (CONFUSION_FILE, "Zero-shot confusion matrix: {name}"),
    (GALLERY_FILE, "Retrieval gallery: {name}"),
    (COMPARE_FILE, "Side by side: {section}"),
    (BARS_FILE, "Headline metrics: {section}"),
]

# Top-level sections of a report dict.
CHECKPOINT_KEY = "checkpoint"
ZEROSHOT_KEY = "zeroshot"
RETRIEVAL_KEY = "retrieval"
LINEAR_PROBE_KEY = "linear_probe"
COMPOSITIONALITY_KEY = "compositionality"
INTRA_MODAL_KEY = "intra_modal"
AVERAGES_KEY = "averages"
SKIPPED_KEY = "skipped"

# Fields of the checkpoint section shown in the Markdown header (others stay in the JSON only).
CHECKPOINT_PATH_KEY = "path"
CHECKPOINT_STEP_KEY = "step"
CHECKPOINT_METHOD_KEY = "method"
MANIFEST_DIGESTS_KEY = "manifest_digests"  # one digest per data manifest the checkpoint read
DATA_WEIGHTS_KEY = "data_weights"  # each build's sampling weight in the run's mixture, same order

# Per-dataset fields; metric names are those evaluation.tasks returns (CLIP_benchmark's names).
PROTOCOL_KEY = "protocol"
ZEROSHOT_COLUMNS = {
    "top-1": TOPK_KEY.format(k=1),
    "top-5": TOPK_KEY.format(k=5),
    "mean per-class recall": MEAN_PER_CLASS_RECALL_KEY,
    "mAP (multi-label)": MEAN_AVERAGE_PRECISION_KEY,
}
IMAGE_TO_TEXT_KEY = TEXT_RETRIEVAL_KEY  # image query, captions retrieved
TEXT_TO_IMAGE_KEY = IMAGE_RETRIEVAL_KEY  # caption query, images retrieved
MISSING = "–"


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
    weights = list(checkpoint.get(DATA_WEIGHTS_KEY) or [])
    weights += [None] * (len(digests) - len(weights))
    data = [
        f"`{d}`" + (f" (weight {w:.3g})" if w is not None and len(digests) > 1 else "")
        for d, w in zip(digests, weights)
        if d
    ]
    path = checkpoint.get(CHECKPOINT_PATH_KEY)
    return [
        "# Evaluation report",
        "",
        f"- Checkpoint: {f'`{path}`' if path else MISSING}",
        f"- Step: {checkpoint.get(CHECKPOINT_STEP_KEY, MISSING)}",
        f"- Method: {checkpoint.get(CHECKPOINT_METHOD_KEY, MISSING)}",
        f"- Data manifest digest(s): {', '.join(data) or MISSING}",
    ] + [
        f"- {label}: {format_info(checkpoint[key])}"
        for key, label in (
            ("topology", "Topology (similarity)"),
            ("scorer", "Scorer"),
            ("fingerprint", "Weights + preprocessing fingerprint"),
        )
        if key in checkpoint
    ]


def format_info(value) -> str:
    """A topology record {"kind", "n", "m", "similarity_range"} as `multi(16, 8), similarity in
    [-8, 8]`; anything else (older reports store the topology's name) as is."""
    if not isinstance(value, dict) or "kind" not in value:
        return str(value)
    rendered = f"{value['kind']}({value.get('n')}, {value.get('m')})"
    if "similarity_range" not in value:
        return rendered
    low, high = ("-inf" if x is None else f"{x:g}" for x in value["similarity_range"])
    return f"{rendered}, similarity in [{low}, {high}]"


def headline(entry: dict) -> float | None:
    """A zero-shot entry's headline number: top-1, or mAP for a multi-label set."""
    return entry.get(TOPK_KEY.format(k=1), entry.get(MEAN_AVERAGE_PRECISION_KEY))


def add_group_averages(report: dict, entries: list[dict]) -> None:
    """Per suite group (e.g. the 17 PGS zero-shot sets), the mean headline metric over the sets
    evaluated, listing those missing: an average over fewer sets is not the paper's number."""
    groups: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("task") == "zeroshot":
            for group in entry.get("groups", []):
                groups.setdefault(group, []).append(entry["name"])
    zeroshot = report.get(ZEROSHOT_KEY, {})
    report[AVERAGES_KEY] = {}
    for group, names in groups.items():
        present = [n for n in names if n in zeroshot]
        values = [headline(zeroshot[n]) for n in present]
        report[AVERAGES_KEY][group] = {
            "mean": sum(values) / len(values) if values else None,
            "datasets": present,
            "missing": [n for n in names if n not in zeroshot],
        }


def format_zeroshot_section(zeroshot: dict[str, dict], averages: dict[str, dict]) -> list[str]:
    """One row per dataset, sorted by name so the JSON round trip renders identically; then each
    suite group as one wide row (datasets as columns, as the papers' tables) with its average."""
    lines = ["## Zero-shot classification", ""]
    if not zeroshot:
        return lines + ["None."]
    columns = {h: k for h, k in ZEROSHOT_COLUMNS.items() if any(k in e for e in zeroshot.values())}
    rows = [
        [name] + [format_percent(entry.get(key)) for key in columns.values()]
        for name, entry in sorted(zeroshot.items())
    ]
    lines += format_table(["dataset", *columns], rows, n_text_columns=1)
    for group, average in sorted(averages.items()):
        names = average["datasets"]
        lines += ["", f"### {group} (top-1; mAP for multi-label)", ""]
        lines += format_table(
            [*names, "average"],
            [[format_percent(headline(zeroshot[n])) for n in names] + [format_percent(average["mean"])]],
            n_text_columns=0,
        )
        if average["missing"]:
            lines += ["", f"Average over {len(names)} sets; missing: {', '.join(average['missing'])}."]
    return lines


def format_attribute_section(zeroshot: dict[str, dict]) -> list[str]:
    """Per zero-shot set whose classes combine attributes: the accuracy of each attribute of the
    top-1 class, and of each other attribute among images with that one right (tasks/zeroshot.py)."""
    entries = {n: e[ATTRIBUTE_ACCURACY_KEY] for n, e in sorted(zeroshot.items()) if e.get(ATTRIBUTE_ACCURACY_KEY)}
    if not entries:
        return []
    keys = list(dict.fromkeys(k for accuracy in entries.values() for k in accuracy))
    header = ["dataset"] + [k.replace("_given_", ", given right ") for k in keys]
    rows = [[name] + [format_percent(accuracy.get(k)) for k in keys] for name, accuracy in entries.items()]
    return ["", "### Attribute accuracy of the top-1 class", ""] + format_table(header, rows, n_text_columns=1)


def figure_caption(file_name: str) -> str:
    for pattern, caption in FIGURE_CAPTIONS:
        fields = {key: f"(?P<{key}>.+)" for key in ("name", "section")}
        match = re.fullmatch(pattern.replace(".", r"\.").format(**fields), file_name)
        if match:
            return caption.format(**match.groupdict())
    return file_name


def format_figures_section(figures: Sequence[str]) -> list[str]:
    """A Markdown image link per PNG written beside report.md."""
    lines = ["## Figures", ""]
    for name in figures:
        lines += [f"![{figure_caption(name)}]({name})", ""]
    return lines[:-1]


def file_safe(name: str) -> str:
    """A dataset name as a file name part."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def format_retrieval_section(retrieval: dict[str, dict]) -> list[str]:
    """Papers' layout: Image→Text R@1/5/10 then Text→Image R@1/5/10, per dataset and protocol."""
    lines = ["## Retrieval", ""]
    if not retrieval:
        return lines + ["None."]
    recall_headers = [f"R@{k}" for k in RECALL_KS]
    header = [
        "dataset",
        "protocol",
        f"Image→Text {recall_headers[0]}",
        *recall_headers[1:],
        f"Text→Image {recall_headers[0]}",
        *recall_headers[1:],
    ]
    keys = [IMAGE_TO_TEXT_KEY.format(k=k) for k in RECALL_KS] + [TEXT_TO_IMAGE_KEY.format(k=k) for k in RECALL_KS]
    rows = [
        [name, str(entry.get(PROTOCOL_KEY, MISSING))] + [format_percent(entry.get(key)) for key in keys]
        for name, entry in sorted(retrieval.items())
    ]
    return lines + format_table(header, rows, n_text_columns=2)


def format_linear_probe_section(probes: dict[str, dict]) -> list[str]:
    lines = ["## Linear probe", ""]
    if not probes:
        return lines + ["None."]
    rows = [
        [name, str(entry.get(PROTOCOL_KEY, MISSING))]
        + [format_percent(entry.get(key)) for key in list(ZEROSHOT_COLUMNS.values())[:3]]
        for name, entry in sorted(probes.items())
    ]
    return lines + format_table(["dataset", "protocol", *list(ZEROSHOT_COLUMNS)[:3]], rows, n_text_columns=2)


def format_compositionality_section(results: dict[str, dict]) -> list[str]:
    """SugarCrepe as its paper lays it out: Replace obj/att/rel, Swap obj/att, Add obj/att, averages."""
    lines = ["## Compositionality (SugarCrepe accuracy)", ""]
    if not results:
        return lines + ["None."]
    averages = [f"{AVERAGE_KEY}_{t}" for t in ("object", "attribute", "relation")] + [AVERAGE_KEY]
    header = (
        ["dataset"]
        + [f"{e.capitalize()} {t[:3]}" for e, t in SUGARCREPE_SUBSETS.values()]
        + ["avg object", "avg attribute", "avg relation", "avg"]
    )
    rows = [
        [name] + [format_percent(entry.get(key)) for key in [*SUGARCREPE_SUBSETS, *averages]]
        for name, entry in sorted(results.items())
    ]
    return lines + format_table(header, rows, n_text_columns=1)


MIXTURE_KEY = "mAP_by_alpha"  # evaluation/task_registry.py mixture_entry


def format_mixture(by_alpha: dict | None) -> str:
    """{"0.25": 0.41, ...} -> "0.25: 41.0 · 0.5: 42.3"."""
    if not by_alpha:
        return MISSING
    return " · ".join(f"{alpha}: {format_percent(value)}" for alpha, value in by_alpha.items())


def format_intra_modal_section(results: dict[str, dict]) -> list[str]:
    lines = ["## Intra-modal retrieval and modality gap", ""]
    if not results:
        return lines + ["None."]
    rows = [
        [
            name,
            str(entry.get(PROTOCOL_KEY, MISSING)),
            *(format_percent(entry.get(key)) for key in (MAP_KEY, MAP_AT_R_KEY, R_PRECISION_KEY)),
            format_mixture(entry.get(MIXTURE_KEY)),
            f"{entry[GAP_KEY]:.3f}" if GAP_KEY in entry else MISSING,
        ]
        for name, entry in sorted(results.items())
    ]
    header = ["dataset", "protocol", "mAP", "mAP@R", "R-precision", "mAP at α (native weight)", "modality gap"]
    return lines + format_table(header, rows, n_text_columns=2)


def format_misalignment_section(rows: list[dict]) -> list[str]:
    """Cross the Gap's view: inverted queries beside the native ones on the same data."""
    lines = [
        "## Intra-modal misalignment",
        "",
        "Inverted queries beside the native ones on the same data: an intra-modal task made "
        "inter-modal (OTI / OVI queries) should gain, an inter-modal one made intra-modal should lose.",
        "",
    ]
    table = [
        [
            r["name"],
            r["native_name"],
            f"{r['metric']} ({r['query']})",
            format_percent(r["native"]),
            format_percent(r["inverted"]),
            f"{100 * (r['inverted'] - r['native']):+.1f}",
            ("gain" if r["expected_sign"] > 0 else "loss") + (" ✓" if r["as_expected"] else " ✗"),
        ]
        for r in rows
    ]
    header = ["inverted entry", "native entry", "metric", "native", "inverted", "Δ", "expected"]
    return lines + format_table(header, table, n_text_columns=3)


def format_skipped_section(skipped: dict[str, str]) -> list[str]:
    lines = ["## Skipped", ""]
    return lines + ([f"- {name}: {reason}" for name, reason in sorted(skipped.items())] or ["None."])


OPTIONAL_SECTIONS = {
    LINEAR_PROBE_KEY: format_linear_probe_section,
    COMPOSITIONALITY_KEY: format_compositionality_section,
    INTRA_MODAL_KEY: format_intra_modal_section,
}


def format_report_markdown(report: dict, figures: Sequence[str] = ()) -> str:
    """The whole report as Markdown: header, zero-shot table (and attribute accuracies),
    retrieval table, optional sections, links to the `figures` (PNG file names), skipped datasets."""
    zeroshot = report.get(ZEROSHOT_KEY, {})
    sections = [
        format_header(report.get(CHECKPOINT_KEY, {})),
        format_zeroshot_section(zeroshot, report.get(AVERAGES_KEY, {})) + format_attribute_section(zeroshot),
        format_retrieval_section(report.get(RETRIEVAL_KEY, {})),
        *[formatter(report[key]) for key, formatter in OPTIONAL_SECTIONS.items() if report.get(key)],
        *([format_misalignment_section(rows)] if (rows := misalignment_rows(report)) else []),
        *([format_figures_section(figures)] if figures else []),
        format_skipped_section(report.get(SKIPPED_KEY, {})),
    ]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def convert_numpy_scalar(value: Any) -> Any:
    """json.dump fallback: NumPy scalars (np.int64 counts, np.float32 metrics) as Python numbers."""
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def write_report(report: dict, out_dir: str | Path, figures: Sequence[str] = ()) -> tuple[Path, Path]:
    """Write `report.json` (sorted keys, indent 2) and `report.md` (linking the PNG file names
    `figures`, written beside it) into `out_dir`; return both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / REPORT_JSON
    md_path = out_dir / REPORT_MD
    json_path.write_text(
        json.dumps(report, sort_keys=True, indent=2, default=convert_numpy_scalar) + "\n", encoding="utf-8"
    )
    md_path.write_text(format_report_markdown(report, figures), encoding="utf-8")
    return json_path, md_path
