"""The demo path end to end at a small size: corpus -> mirror -> prepare -> CLIP -> report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


NOISE = (
    "Failed to query Ray Train Controller",
    "TrainingReport(",
    "initialized randomly",
    "all_gather is deprecated",
    "Progress bars disabled",
    "logging_progress.py",
)
STAGES = (
    "corpus",
    "prepare",
    "prepare/plan",
    "prepare/download",
    "prepare/dedup",
    "prepare/publish",
    "train",
    "evaluate",
    "evaluate/load",
    "evaluate/encode",
    "evaluate/score",
    "evaluate/report",
)


def check_console(text: str, windows: list[str]) -> None:
    """The demo's console reads like a tool's: short, every stage started and ended, exactly
    one training line per logging window (not one per worker), the report, and none of Ray's
    known noise."""
    lines = text.splitlines()
    assert len(lines) < 150, text
    for name in STAGES:
        assert any(line.startswith(f"==> {name}") for line in lines), name
        assert any(line.startswith(f"<== {name} done in ") for line in lines), name
    train_lines = [line for line in lines if line.startswith("train  step ")]
    assert [line.split()[2] for line in train_lines] == windows, text
    assert "loss " in train_lines[0] and train_lines[-1].endswith("eta done"), text
    assert any(line.startswith("encode images  image ") for line in lines), text
    assert "# Evaluation report" in text and "zero-shot top-1" in text
    for noise in NOISE:
        assert noise not in text, noise


def test_demo_runs_end_to_end(ray_session, tmp_path, capfd):
    import run_demo  # the demo's kind of image tower (a ResNet), at micro size

    report = run_demo.main(
        [
            "--out",
            str(tmp_path),
            "--n-images",
            "96",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--arch",
            "clip-rn-micro-32",
            "--shard-size",
            "12",
            "--log-every",
            "4",
        ]
    )
    assert set(report["zeroshot"]) == {"demo-zeroshot"} and report["skipped"] == {}
    assert report["zeroshot"]["demo-zeroshot"]["n_classes"] == 40
    assert set(report["retrieval"]) == {"demo-retrieval", "demo-long"}
    assert report["retrieval"]["demo-long"]["protocol"] == "long-caption"
    assert report["checkpoint"]["method"] == "clip" and report["checkpoint"]["manifest_digests"][0]
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["zeroshot"] == json.loads(json.dumps(report["zeroshot"]))
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Zero-shot classification" in markdown and "shape, given right colour" in markdown
    for figure in ("plot_training_curves.png", "plot_confusion_demo-zeroshot.png", "plot_gallery_demo-retrieval.png"):
        assert f"]({figure})" in markdown and (tmp_path / "report" / figure).stat().st_size > 0, figure
    assert json.loads((tmp_path / "demo_summary.json").read_text())["chance"] == 1 / 40
    # in-run evaluation at the last step (the demo's every 100 steps is past this short run's end)
    # logged what the evaluation job then reported for that step's checkpoint
    *_, last = [json.loads(line) for line in (tmp_path / "runs" / "demo-clip" / "metrics.jsonl").open()]
    assert last["eval/zeroshot/top1"] == pytest.approx(report["zeroshot"]["demo-zeroshot"]["top1"], abs=1e-6)
    assert last["eval/retrieval/image_retrieval_recall@5"] == pytest.approx(
        report["retrieval"]["demo-retrieval"]["image_retrieval_recall@5"], abs=1e-6
    )
    captured = capfd.readouterr()
    steps = report["checkpoint"]["step"]  # a line every 4 steps, and the last step's (its checkpoint)
    check_console(captured.out + captured.err, [f"{s}/{steps}" for s in sorted({*range(4, steps + 1, 4), steps})])
