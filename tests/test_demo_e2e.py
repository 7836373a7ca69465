"""The demo path end to end at a small size: corpus -> mirror -> prepare -> FLIP -> report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_demo_runs_end_to_end(ray_session, tmp_path):
    import run_demo
    report = run_demo.main(["--out", str(tmp_path), "--n-images", "96", "--epochs", "2",
                            "--batch-size", "8", "--arch", "clip-micro-p8-32", "--shard-size", "12"])
    assert set(report["zeroshot"]) == {"demo-zeroshot"} and report["skipped"] == {}
    assert report["zeroshot"]["demo-zeroshot"]["n_classes"] == 40
    assert set(report["retrieval"]) == {"demo-retrieval", "demo-long"}
    assert report["retrieval"]["demo-long"]["protocol"] == "long-caption"
    assert report["checkpoint"]["method"] == "flip" and report["checkpoint"]["manifest_digests"][0]
    on_disk = json.loads((tmp_path / "report" / "report.json").read_text())
    assert on_disk["zeroshot"] == json.loads(json.dumps(report["zeroshot"]))
    assert "Zero-shot classification" in (tmp_path / "report" / "report.md").read_text()
    assert json.loads((tmp_path / "demo_summary.json").read_text())["chance"] == 1 / 40
