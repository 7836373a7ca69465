"""Our shards are OpenCLIP's too: its own trainer (`open_clip_train.main`, our tiny model
configs registered) trains from a build the test prepares, through its WebDataset loader
(`--dataset-type webdataset`, a brace range over the tars), reading the `<key>.txt` captions
and taking the dataset size from shards/sizes.json (no --train-num-samples)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.bench_vs_open_clip import OPEN_CLIP_DRIVER
from pipelines import shards
from training.towers import MODEL_CONFIG_DIR

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_open_clip_trains_on_a_build(small_build, tmp_path):
    build_uri = small_build[3]
    manifest = shards.read_manifest(build_uri)
    last = len(manifest["shards"]) - 1
    train_data = f"{build_uri}/shards/{{000000..{last:06d}}}.tar"
    argv = [
        "--dataset-type",
        "webdataset",
        "--train-data",
        train_data,
        "--batch-size",
        "4",
        "--model",
        "clip-micro-p8-32",
        "--epochs",
        "1",
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--lr",
        "1e-3",
        "--warmup",
        "1",
        "--log-every-n-steps",
        "1",
        "--logs",
        str(tmp_path / "logs"),
        "--name",
        "ours",
        "--report-to",
        "",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_DRIVER, str(MODEL_CONFIG_DIR), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )  # a tar without txt: it waits forever
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    total = sum(e["n_samples"] for e in manifest["shards"])
    # open_clip logs "Train Epoch: 0 [seen/total ...]" with the size it read from sizes.json
    assert f"/{total} " in log or f"/{total}]" in log, log[-3000:]
    assert "Loss:" in log
    assert (tmp_path / "logs" / "ours" / "checkpoints" / "epoch_1.pt").exists()
