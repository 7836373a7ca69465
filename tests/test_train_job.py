"""training/train.py through Ray Train: a two-worker run, resume equality, the run guard."""
from __future__ import annotations

import json

import pytest

from training import checkpoint, train

pytestmark = pytest.mark.ray


# The shards' sizes depend on the mirror's port (it is in every URL, hence every key), so
# the small build uses 6-image shards and 4-image batches: a worker then always has whole
# batches for many more steps than the six these tests run.
def run_args(build_uri: str, storage, name: str, *extra: str) -> list[str]:
    return ["--data", build_uri, "--method", "flip", "--arch", "clip-micro-p8-32",
            "--num-workers", "2", "--batch-size", "4", "--epochs", "3", "--warmup-steps", "2",
            "--lr", "1e-3", "--storage", str(storage), "--run-name", name, "--log-every", "1",
            "--checkpoint-every", "100", *extra]


def step_losses(storage, name: str) -> dict[int, float]:
    lines = (storage / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss/total"] for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight_run(small_build, tmp_path_factory):
    storage = tmp_path_factory.mktemp("runs")
    result = train.main(run_args(small_build[3], storage, "straight", "--max-steps", "6"))
    return storage, result


def test_two_worker_run_trains_and_checkpoints(straight_run):
    storage, result = straight_run
    losses = step_losses(storage, "straight")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(v == v and v > 0 for v in losses.values())
    directory = checkpoint.fetch_checkpoint(str(storage / "straight"))
    state = checkpoint.read_state(directory)
    assert state["step"] == 6 and state["config"]["method"] == "flip"
    assert state["manifest_digest"] and state["data_uri"]


def test_resume_continues_with_the_same_losses(small_build, straight_run, tmp_path):
    storage, _ = straight_run
    build_uri = small_build[3]
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "3"))
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "6", "--resume"))
    straight, resumed = step_losses(storage, "straight"), step_losses(tmp_path, "resumed")
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]


def test_new_run_refuses_to_overwrite_and_resume_needs_a_run(small_build, straight_run, tmp_path):
    storage, _ = straight_run
    with pytest.raises(SystemExit, match="--resume"):
        train.main(run_args(small_build[3], storage, "straight"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(run_args(small_build[3], tmp_path, "never-ran", "--resume"))
