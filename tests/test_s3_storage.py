"""Checkpoints to `s3://` through s3fs against a real S3-compatible server on loopback
(moto_server), read back by the evaluation-side loader and exported for open_clip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import S3_BUCKET as BUCKET

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def test_checkpoints_go_to_s3_and_load_back(small_build, s3_env, tmp_path):
    from training import checkpoint, export
    from training.inference import load_inference_model

    build_uri = small_build[3]
    storage = f"s3://{BUCKET}/runs"

    # Its own process (own local Ray instance), so every Ray worker inherits the AWS variables
    # exactly as pods inherit them from a secret.
    def train(*extra: str) -> None:
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "training" / "train.py"),
                "--data",
                build_uri,
                "--method",
                "clip",
                "--arch",
                "clip-micro-p8-32",
                "--num-workers",
                "1",
                "--batch-size",
                "8",
                "--storage",
                storage,
                "--run-name",
                "s3run",
                "--log-every",
                "1",
                *extra,
            ],
            env={**os.environ, **s3_env},
            capture_output=True,
            text=True,
            timeout=600,
        )
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
    exported = export.export_open_clip(f"{storage}/s3run", f"s3://{BUCKET}/export/micro.pt")
    assert fs.exists(exported)


def upload_micro_checkpoint(tmp_path) -> str:
    import s3fs

    from tests.eval_fixtures import save_micro_checkpoint

    local = save_micro_checkpoint(tmp_path / "run" / "step_00000001")
    s3fs.S3FileSystem().put(str(local), f"{BUCKET}/runs/micro/step_00000001", recursive=True)
    return f"s3://{BUCKET}/runs/micro"


def test_an_s3_checkpoint_is_downloaded_once_per_machine(s3_env, tmp_path, monkeypatch):
    import threading

    import s3fs

    from training import checkpoint

    run = upload_micro_checkpoint(tmp_path)
    gets, real_get = [], s3fs.S3FileSystem.get

    def counting_get(self, rpath, lpath, *args, **kwargs):
        gets.append(str(rpath).rsplit("/", 1)[-1])
        return real_get(self, rpath, lpath, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "get", counting_get)
    found = []
    threads = [
        threading.Thread(target=lambda: found.append(checkpoint.locate_checkpoint(run, str(tmp_path / "c"))))
        for _ in range(4)
    ]  # four encoder actors of one node
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {source for source, _ in found} == {f"{run}/step_00000001"}
    assert len({local for _, local in found}) == 1 and checkpoint.is_complete(found[0][1])
    assert gets.count(checkpoint.MODEL_FILE) == 1  # one download, the other three found it complete


def test_evaluation_of_an_s3_checkpoint_cleans_its_node_folders(small_corpus, s3_env, tmp_path):
    from training import checkpoint

    run = upload_micro_checkpoint(tmp_path)
    corpus, _ = small_corpus
    scratch = Path(tempfile.mkdtemp(prefix="ev", dir="/tmp"))  # TMPDIR: Ray's socket paths must stay < 108 bytes
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluation" / "evaluate.py"),
            "--checkpoint",
            run,
            "--zeroshot",
            str(corpus.zeroshot_dir),
            "--output",
            str(tmp_path / "report"),
            "--cache",
            "none",
            "--num-encoders",
            "2",
        ],
        env={**os.environ, **s3_env, "TMPDIR": str(scratch)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["checkpoint"]["checkpoint_uri"] == f"{run}/step_00000001"
    leftover = list((scratch / "clipforge-checkpoints").iterdir())  # created for the job, emptied after
    copies = list(scratch.rglob(checkpoint.MODEL_FILE))  # the driver's copy too (it shares the folder)
    shutil.rmtree(scratch, ignore_errors=True)
    assert leftover == [] and copies == []
