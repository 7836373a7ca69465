"""PNG plots of evaluation reports (matplotlib, Agg backend): one bar chart per report section
with the headline metric of each dataset, and, given several reports (checkpoints), grouped
bars side by side.

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

from evaluation.datasets.compositional import SUGARCREPE_SUBSETS  # noqa: E402
from evaluation.report import headline  # noqa: E402
from evaluation.tasks.intra_modal import MAP_KEY  # noqa: E402

# section -> (title, entry -> {bar label suffix: fraction}); each bar is shown in percent
PANELS = {
    "zeroshot": ("Zero-shot top-1 (mAP for multi-label)", lambda e: {"": headline(e)}),
    "retrieval": ("Retrieval R@1", lambda e: {"I→T": e.get("text_retrieval_recall@1"),
                                              "T→I": e.get("image_retrieval_recall@1")}),
    "linear_probe": ("Linear probe top-1", lambda e: {"": e.get("top1")}),
    "compositionality": ("SugarCrepe accuracy", lambda e: {k: e.get(k) for k in [*SUGARCREPE_SUBSETS, "average"]}),
    "intra_modal": ("Intra-modal retrieval mAP", lambda e: {"": e.get(MAP_KEY)}),
}
BARS_FILE = "plot_{section}.png"
COMPARE_FILE = "compare_{section}.png"


def panel_values(reports: list[dict], section: str) -> tuple[list[str], np.ndarray]:
    """Dataset names present in any report, and (n_reports, n_datasets) percentages (NaN if absent)."""
    metric = PANELS[section][1]
    per_report = [{f"{name} {suffix}".strip(): value for name, entry in report.get(section, {}).items()
                   for suffix, value in metric(entry).items()} for report in reports]
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
        bars = ax.bar(x + (i - (len(reports) - 1) / 2) * width, np.nan_to_num(values[i]), width,
                      label=label_of(report, i))
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


def write_plots(report: dict, out_dir: str | Path, compare: list[str] = ()) -> list[Path]:
    """A bar chart per non-empty section of `report`; with `compare` (other report.json files),
    a side-by-side chart per section as well. Returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    others = [json.loads(Path(path).read_text(encoding="utf-8")) for path in compare]
    written = []
    for section in PANELS:
        if report.get(section):
            written.append(draw_bars([report], section, out_dir / BARS_FILE.format(section=section)))
        if others and any(r.get(section) for r in [report, *others]):
            written.append(draw_bars([report, *others], section, out_dir / COMPARE_FILE.format(section=section)))
    return written


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", help="report.json files, one per checkpoint")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    first = json.loads(Path(args.reports[0]).read_text(encoding="utf-8"))
    return write_plots(first, args.out, args.reports[1:])


if __name__ == "__main__":
    print("\n".join(str(p) for p in main()))
