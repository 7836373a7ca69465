"""PNG plots of evaluation reports (matplotlib, Agg backend): one bar chart per report section
with the headline metric of each dataset, and, given several reports (checkpoints), grouped
bars side by side; with them the pictures of evaluation/figures.py (confusion matrices,
training curves, retrieval galleries). report.md links them all.

    python -m evaluation.plots reports/a/report.json reports/b/report.json --out reports/compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from evaluation import figures  # noqa: E402
from evaluation.datasets.compositional import SUGARCREPE_SUBSETS  # noqa: E402
from evaluation.misalignment import misalignment_rows  # noqa: E402
from evaluation.report import (
    BARS_FILE,
    COMPARE_FILE,
    CONFUSION_FILE,
    CURVES_FILE,
    GALLERY_FILE,  # noqa: E402
    MISALIGNMENT_FILE,
    file_safe,
    headline,
)
from evaluation.tasks.intra_modal import MAP_KEY  # noqa: E402

# section -> (title, entry -> {bar label suffix: fraction}); each bar is shown in percent
PANELS = {
    "zeroshot": ("Zero-shot top-1 (mAP for multi-label)", lambda e: {"": headline(e)}),
    "retrieval": (
        "Retrieval R@1",
        lambda e: {"I→T": e.get("text_retrieval_recall@1"), "T→I": e.get("image_retrieval_recall@1")},
    ),
    "linear_probe": ("Linear probe top-1", lambda e: {"": e.get("top1")}),
    "compositionality": ("SugarCrepe accuracy", lambda e: {k: e.get(k) for k in [*SUGARCREPE_SUBSETS, "average"]}),
    "intra_modal": ("Intra-modal retrieval mAP", lambda e: {"": e.get(MAP_KEY)}),
}
GALLERY_MAX_SETS = 3  # retrieval sets drawn as a gallery, in report order


def panel_values(reports: list[dict], section: str) -> tuple[list[str], np.ndarray]:
    """Dataset names present in any report, and (n_reports, n_datasets) percentages (NaN if absent)."""
    metric = PANELS[section][1]
    per_report = [
        {
            f"{name} {suffix}".strip(): value
            for name, entry in report.get(section, {}).items()
            for suffix, value in metric(entry).items()
        }
        for report in reports
    ]
    names = list(dict.fromkeys(name for bars in per_report for name in bars))  # the report's order
    values = np.full((len(reports), len(names)), np.nan)
    for i, bars in enumerate(per_report):
        for j, name in enumerate(names):
            if bars.get(name) is not None:
                values[i, j] = 100 * bars[name]
    return names, values


def label_of(report: dict, index: int) -> str:
    info = report.get("checkpoint", {})
    where = str(info.get("path", "")).rstrip("/").rsplit("/", 1)[-1]
    return f"{index + 1}: {info.get('method', '?')} step {info.get('step', '?')} {where}".strip()


def draw_bars(reports: list[dict], section: str, out_file: Path) -> Path:
    names, values = panel_values(reports, section)
    width = 0.8 / len(reports)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) * len(reports) + 2), 4.5))
    x = np.arange(len(names))
    for i, report in enumerate(reports):
        bars = ax.bar(
            x + (i - (len(reports) - 1) / 2) * width, np.nan_to_num(values[i]), width, label=label_of(report, i)
        )
        ax.bar_label(bars, labels=["–" if np.isnan(v) else f"{v:.1f}" for v in values[i]], fontsize=7)
    crowded = len(names) > 4 or sum(len(n) for n in names) > 48  # labels would overlap flat
    ax.set_xticks(x, names, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylabel("%")
    ax.set_ylim(0, max(100, np.nanmax(values, initial=0) * 1.1))
    ax.set_title(PANELS[section][0])
    if len(reports) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
    return out_file


def write_figures(report: dict, out_dir: Path, metrics: list[dict]) -> list[Path]:
    """Training curves (when the run logged `metrics`), a confusion matrix per zero-shot set
    that stored its counts, a gallery per retrieval set that stored one (the first few)."""
    written = []
    if metrics:
        checkpoint = report.get("checkpoint", {})
        written.append(
            figures.draw_training_curves(
                metrics, out_dir / CURVES_FILE, figures.curves_title(checkpoint), checkpoint.get("step")
            )
        )
    for name, entry in report.get("zeroshot", {}).items():
        if entry.get("confusion"):
            written.append(figures.draw_confusion(name, entry, out_dir / CONFUSION_FILE.format(name=file_safe(name))))
    rows = misalignment_rows(report)
    if rows:
        written.append(figures.draw_misalignment(rows, out_dir / MISALIGNMENT_FILE))
    galleries = [(n, e) for n, e in report.get("retrieval", {}).items() if e.get("gallery")][:GALLERY_MAX_SETS]
    for name, entry in galleries:
        written.append(figures.draw_gallery(name, entry, out_dir / GALLERY_FILE.format(name=file_safe(name))))
    return [path for path in written if path is not None]


def write_plots(report: dict, out_dir: str | Path, compare: list[str] = (), metrics: list[dict] = ()) -> list[Path]:
    """A bar chart per non-empty section of `report`; with `compare` (other report.json files),
    a side-by-side chart per section as well; then `write_figures` (`metrics`: the run's
    logging windows, figures.load_run_metrics). Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    others = [json.loads(Path(path).read_text(encoding="utf-8")) for path in compare]
    written = []
    for section in PANELS:
        if report.get(section):
            written.append(draw_bars([report], section, out_dir / BARS_FILE.format(section=section)))
        if others and any(r.get(section) for r in [report, *others]):
            written.append(draw_bars([report, *others], section, out_dir / COMPARE_FILE.format(section=section)))
    return written + write_figures(report, out_dir, list(metrics))


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files, one per checkpoint")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    first = json.loads(Path(args.reports[0]).read_text(encoding="utf-8"))
    return write_plots(first, args.out, args.reports[1:], figures.load_run_metrics(first.get("checkpoint", {})))


if __name__ == "__main__":
    print("\n".join(str(p) for p in main()))
