"""Checkpoints to `s3://` through s3fs against a real S3-compatible server on loopback
(moto_server), read back by the evaluation-side loader and exported for open_clip."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import S3_BUCKET as BUCKET

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]



def test_checkpoints_go_to_s3_and_load_back(small_build, s3_env, tmp_path):
    from training import checkpoint
    from training.inference import load_inference_model
    build_uri = small_build[3]
    storage = f"s3://{BUCKET}/runs"
    # Its own process (own local Ray instance), so every Ray worker inherits the AWS variables
    # exactly as pods inherit them from a secret.
    def train(*extra: str) -> None:
        result = subprocess.run(
            [sys.executable, str(ROOT / "training" / "train.py"), "--data", build_uri, "--method", "clip",
             "--arch", "clip-micro-p8-32", "--num-workers", "1", "--batch-size", "8",
             "--storage", storage, "--run-name", "s3run", "--log-every", "1", *extra],
            env={**os.environ, **s3_env}, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    train("--max-steps", "1")
    train("--max-steps", "2", "--resume")
    import s3fs
    fs = s3fs.S3FileSystem()
    lines = [json.loads(x) for x in fs.cat(f"{BUCKET}/runs/s3run/metrics.jsonl").decode().splitlines()]
    assert [(r["step"], r["start_step"]) for r in lines] == [(1, 0), (2, 1)]  # both attempts, once each
    events = fs.glob(f"{BUCKET}/runs/s3run/tensorboard/events.out.tfevents.*")
    assert len(events) == 2 and all(fs.size(e) > 0 for e in events)
    directory = checkpoint.fetch_checkpoint(f"{storage}/s3run")
    assert checkpoint.is_complete(directory) and checkpoint.read_state(directory)["step"] == 2
    bundle = load_inference_model(f"{storage}/s3run")
    assert bundle.info["step"] == 2 and bundle.info["arch"] == "clip-micro-p8-32"
    exported = checkpoint.export_open_clip(f"{storage}/s3run", f"s3://{BUCKET}/export/micro.pt")
    assert fs.exists(exported)
