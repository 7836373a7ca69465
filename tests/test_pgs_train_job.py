"""CLIP-PGS through training/train.py on Ray Train: two workers, both selection modes, the
realised drop in the logged metrics, the PGS settings in the checkpoint's config."""

from __future__ import annotations

import json

import pytest

from training import checkpoint, train

pytestmark = pytest.mark.ray


def run_args(build_uri: str, storage, name: str, method: str, mode: str) -> list[str]:
    return [
        "--data",
        build_uri,
        "--method",
        method,
        "--set",
        f"pgs.mode={mode}",
        "--arch",
        "clip-micro-p8-32",
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--storage",
        str(storage),
        "--run-name",
        name,
        "--log-every",
        "1",
        "--checkpoint-every",
        "100",
        "--max-steps",
        "4",
    ]


@pytest.mark.parametrize("method, mode", [("pgs0.3", "paper"), ("pgs0.5", "reference")])
def test_pgs_run_trains_logs_its_drop_and_checkpoints(small_build, tmp_path, method, mode):
    train.main(run_args(small_build[3], tmp_path, "pgs", method, mode))
    rows = [json.loads(line) for line in (tmp_path / "pgs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["loss/total"] == r["loss/total"] and r["loss/total"] > 0
        if mode == "paper":  # L = 16: each image drops ceil(4.8) = 5 .. 8 patches
            assert 5 / 16 <= r["masking/drop_fraction_min"] <= r["masking/drop_fraction_max"] <= 8 / 16
        else:  # one count for the batch, at least 8 (more when every image is self-similar)
            assert r["masking/drop_fraction_min"] == r["masking/drop_fraction_max"] >= 8 / 16
        assert r["masking/kept_patches"] == pytest.approx(16 * (1 - r["masking/drop_fraction"]))
    state = checkpoint.read_state(checkpoint.fetch_checkpoint(str(tmp_path / "pgs")))
    assert state["step"] == 4 and state["config"]["method"] == method
    assert state["config"]["pgs"]["mode"] == mode and state["config"]["masking"]["kind"] == "pgs"
