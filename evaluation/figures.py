"""The report's pictures beyond bar charts (matplotlib, Agg backend): the zero-shot confusion
matrix of a set (grouped by its first class attribute, e.g. colour blocks of shapes), the
training curves of the evaluated checkpoint's run (its `metrics.jsonl`) and a retrieval gallery
(a few image queries with their best captions, right ones in green)."""

from __future__ import annotations

import fnmatch
import io
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from scoring.sets.files import read_image  # noqa: E402
from pipelines import storage  # noqa: E402

METRICS_FILE = "metrics.jsonl"  # training/train.py: one JSON line per logging window, in the run directory
ANNOTATE_MAX_CLASSES = 20  # confusion cells carry their count up to this many classes
RIGHT = "#1a7f37"
WRONG = "#b42318"
NOTE = "#555555"


# ---------------------------------------------------------------- confusion matrix


def class_order(classnames: list[str], attributes: dict[str, list[str]]) -> tuple[list[int], list[str]]:
    """Class indices grouped by the first attribute (then the others), values in order of first
    appearance, and each class's tick label: its other attributes' values (its name without any)."""
    if not attributes:
        return list(range(len(classnames))), list(classnames)
    rank = {a: {v: i for i, v in enumerate(dict.fromkeys(values))} for a, values in attributes.items()}
    order = sorted(range(len(classnames)), key=lambda c: ([rank[a][vs[c]] for a, vs in attributes.items()], c))
    others = list(attributes)[1:]
    labels = [" ".join(attributes[a][c] for a in others) if others else classnames[c] for c in order]
    return order, labels


def group_spans(values: list[str]) -> list[tuple[str, int, int]]:
    """(value, first, last) of each run of equal consecutive values."""
    spans = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            spans.append((values[start], start, i - 1))
            start = i
    return spans


def draw_groups(ax, spans: list[tuple[str, int, int]], fontsize: float) -> None:
    """Separator lines between groups; group names just above the columns and right of the rows."""
    for value, first, last in spans:
        if first > 0:
            ax.axhline(first - 0.5, color="black", lw=0.8)
            ax.axvline(first - 0.5, color="black", lw=0.8)
        middle = (first + last) / 2
        style = {"textcoords": "offset points", "fontsize": fontsize, "fontweight": "bold"}
        ax.annotate(
            value, (middle, 1), xycoords=("data", "axes fraction"), xytext=(0, 3), ha="center", va="bottom", **style
        )
        ax.annotate(
            value, (1, middle), xycoords=("axes fraction", "data"), xytext=(4, 0), ha="left", va="center", **style
        )


def confusion_title(name: str, entry: dict, width: int) -> str:
    title = (
        f"Zero-shot confusion: {name} (top-1 {100 * entry.get('top1', float('nan')):.1f} %, "
        f"{entry.get('n_images', '?')} images)"
    )
    accuracy = entry.get("attribute_accuracy") or {}
    parts = [f"{k.replace('_given_', ' | ')} right {100 * v:.1f} %" for k, v in accuracy.items() if v is not None]
    unbroken = [part.replace(" ", "\u00a0") for part in parts]  # textwrap breaks lines between parts only
    return "\n".join([title, *textwrap.wrap(" · ".join(unbroken), width)])


def draw_confusion(name: str, entry: dict, out_file: Path) -> Path:
    """Rows true class, columns top-1 prediction, coloured by the fraction of the row's images."""
    confusion = entry["confusion"]
    counts = np.asarray(confusion["counts"], dtype=np.int64)
    attributes = confusion.get("attributes") or {}
    order, labels = class_order(confusion["classnames"], attributes)
    counts = counts[np.ix_(order, order)]
    n = len(order)
    fractions = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = float(np.clip(0.24 * n + 4, 6, 22))
    fontsize = float(np.clip(320 / max(n, 1), 7, 10))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), labels, fontsize=fontsize)
    if n <= ANNOTATE_MAX_CLASSES:
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=fontsize,
                    color="white" if fractions[i, j] > 0.5 else "black",
                )
    if attributes:
        draw_groups(ax, group_spans([list(attributes.values())[0][c] for c in order]), fontsize + 1)
    ax.set_xlabel("predicted class (top-1)")
    ax.set_ylabel("true class")
    ax.set_title(confusion_title(name, entry, int(8 * side)), pad=fontsize + 10 if attributes else 8)
    fig.colorbar(
        image,
        ax=ax,
        fraction=0.035,
        pad=1.0 / side if attributes else 0.03,
        label="fraction of the true class's images",
    )
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


# ---------------------------------------------------------------- training curves


def run_directories(checkpoint_info: dict) -> list[str]:
    """Where the evaluated checkpoint's run directory may be: the folder holding the local
    checkpoint (a run directory holds `step_XXXXXXXX/` checkpoints), else the path given (a run
    directory) or its parent (a checkpoint in one), local or s3://."""
    path = str(checkpoint_info.get("path", "")).rstrip("/")
    resolved = checkpoint_info.get("resolved")
    if checkpoint_info.get("method") == "open_clip":  # an off-the-shelf model has no run
        return []
    if path and not path.startswith("s3://"):
        return [str(Path(resolved or path).parent)] if resolved else [path, str(Path(path).parent)]
    return [path, path.rsplit("/", 1)[0]] if path else []


def load_run_metrics(checkpoint_info: dict) -> list[dict]:
    """The logging windows of the checkpoint's run (`metrics.jsonl`), one per step (a resumed run
    logs a step again: the last line wins), by step; [] when the run has no such file."""
    for directory in run_directories(checkpoint_info):
        fs, file = storage.open_storage(storage.join(directory, METRICS_FILE))
        if fs.isfile(file):
            rows = [json.loads(line) for line in storage.read_bytes(fs, file).decode().splitlines() if line.strip()]
            by_step = {row["step"]: row for row in rows if "step" in row}
            return [by_step[step] for step in sorted(by_step)]
    return []


def curves_title(checkpoint_info: dict) -> str:
    directories = run_directories(checkpoint_info)
    step = checkpoint_info.get("step")
    run = Path(directories[0]).name if directories else "the run"
    return f"Training curves of {run}" + (f" (evaluated at step {step}, dashed)" if step is not None else "")


# panel title -> metric keys; a key ending in "/" takes every metric with that prefix
CURVE_PANELS = {
    "loss": ["loss/"],
    "temperature": ["temperature"],
    "learning rate": ["lr"],
    "throughput (samples / s)": ["samples_per_s"],
    "data wait (fraction of time)": ["data_wait_fraction"],
    "gradient norm": ["grad_norm"],
    # in-run evaluation (training/in_run_eval.py): one line per set
    "in-run zero-shot top-1": ["eval/*/top1"],
    "in-run retrieval R@1": ["eval/*/image_retrieval_recall@1", "eval/*/text_retrieval_recall@1"],
}


def panel_series(rows: list[dict], keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Metric name -> (steps, values) of the rows that log it; a key ending in "/" matches
    every metric under it, one with "*" is a shell pattern ("eval/*/top1")."""

    def matches(name: str, key: str) -> bool:
        return name.startswith(key) if key.endswith("/") else fnmatch.fnmatchcase(name, key)

    names = dict.fromkeys(k for row in rows for k in row if any(matches(k, p) for p in keys))
    series = {}
    for name in names:
        points = [(row["step"], row[name]) for row in rows if isinstance(row.get(name), (int, float))]
        if points:
            series[name] = tuple(np.asarray(v, dtype=np.float64) for v in zip(*points))
    return series


def draw_training_curves(rows: list[dict], out_file: Path, title: str, step: int | None = None) -> Path | None:
    """One subplot per panel with data, metric vs step; a dashed line at the evaluated step.
    None (no file) when the rows log none of the panels' metrics."""
    panels = {t: panel_series(rows, keys) for t, keys in CURVE_PANELS.items()}
    panels = {t: series for t, series in panels.items() if series}
    if not panels:
        return None
    n_cols = min(3, len(panels))
    n_rows = -(-len(panels) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(5 * n_cols, 3.4 * n_rows), squeeze=False)
    for ax, (panel, series) in zip(axes.flat, panels.items()):
        for name, (steps, values) in series.items():
            ax.plot(
                steps,
                values,
                lw=2 if name == "loss/total" else 1.2,
                label=name.removeprefix("loss/").removeprefix("eval/"),
                marker="." if len(steps) < 30 else None,
            )
        if step is not None:
            ax.axvline(step, color="grey", ls="--", lw=0.8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        if len(series) > 1 or panel.startswith("in-run"):  # an in-run line is named by its set
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


# ---------------------------------------------------------------- retrieval gallery


def load_thumbnail(uri: str | None) -> Image.Image | None:
    """The query image, or None when it cannot be read (held in a shard, moved, unreadable)."""
    if not uri:
        return None
    try:
        return Image.open(io.BytesIO(read_image(uri))).convert("RGB")
    except (OSError, ValueError):
        return None


def shorten(text: str, width: int = 95, lines: int = 2) -> str:
    return "\n".join(textwrap.wrap(" ".join(text.split()), width, max_lines=lines, placeholder=" …"))


def draw_query(image_ax, text_ax, query: dict, rank: int) -> None:
    thumbnail = load_thumbnail(query.get("image"))
    if thumbnail is None:
        image_ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", color=NOTE)
    else:
        image_ax.imshow(thumbnail)
    image_ax.axis("off")
    text_ax.axis("off")
    lines = [(f"query {rank}, a true caption: {shorten(query.get('caption', ''), lines=1)}", NOTE)]
    lines += [
        (
            f"{'✓' if t['correct'] else '✗'} {i}. ({t['score']:.3f})  {shorten(t['text'])}",
            RIGHT if t["correct"] else WRONG,
        )
        for i, t in enumerate(query["top"], 1)
    ]
    y = 0.95
    for text, colour in lines:
        text_ax.text(0, y, text, va="top", fontsize=9, color=colour, transform=text_ax.transAxes)
        y -= 0.12 + 0.11 * text.count("\n") + 0.08


def draw_gallery(name: str, entry: dict, out_file: Path) -> Path:
    """A row per image query: the image, then its best captions (✓ green = one of its own)."""
    gallery = entry["gallery"]
    fig, axes = plt.subplots(
        len(gallery), 2, figsize=(12, 2.2 * len(gallery)), squeeze=False, gridspec_kw={"width_ratios": [1, 5]}
    )
    for rank, (query, (image_ax, text_ax)) in enumerate(zip(gallery, axes), 1):
        draw_query(image_ax, text_ax, query, rank)
    r1 = entry.get("text_retrieval_recall@1")
    fig.suptitle(
        f"Retrieval gallery: {name}, image → text top-{len(gallery[0]['top'])}"
        + (f" (I→T R@1 {100 * r1:.1f} % over {entry.get('n_images', '?')} images)" if r1 is not None else "")
    )
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def draw_misalignment(rows: list[dict], out_file: Path) -> Path:
    """Native and inverted values side by side, one pair per inverted entry; the inverted bar
    green when it moved the expected way (gain for intra-modal tasks, loss for inter-modal)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.8))
    x = np.arange(len(rows))
    native = [100 * r["native"] for r in rows]
    inverted = [100 * r["inverted"] for r in rows]
    ax.bar(x - 0.2, native, 0.4, label="native queries", color="#9aa5b1")
    colours = ["#2e8b57" if r["as_expected"] else "#c0392b" for r in rows]
    bars = ax.bar(x + 0.2, inverted, 0.4, label="inverted (green: the expected direction)", color=colours)
    ax.bar_label(bars, labels=[f"{100 * (r['inverted'] - r['native']):+.1f}" for r in rows], fontsize=8)
    ax.set_xticks(
        x,
        [f"{r['name']}\n{r['metric']}" for r in rows],
        rotation=30 if len(rows) > 4 else 0,
        ha="right" if len(rows) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel("%")
    ax.set_ylim(0, max(100.0, max(native + inverted, default=0) * 1.1))
    ax.set_title(
        "Intra-modal misalignment: native against inverted queries\n"
        "(intra-modal tasks should gain from inversion, inter-modal ones should lose)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file
