"""CIBR through Ray Train with two gloo workers and FLIP patch dropping: the estimators stay
bit-identical on both ranks (every checkpoint compares the ranks' digests of the estimators'
weights, EMA state and Adam moments, and records them), the frozen reference towers are
stored once in the run directory and read back on resume even when `--pretrained` is gone,
and a run stopped at step 2 and resumed logs steps 3-5 and ends with every tensor of both
optimisers and the estimators exactly as the uninterrupted run."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.eval_fixtures import save_micro_checkpoint
from training import checkpoint, export, train
from training.auxiliary import parts_of, state_digest
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.ray

STEPS = 5


def run_args(build_uri: str, storage, name: str, pretrained: str, *extra: str) -> list[str]:
    return [
        "--data",
        build_uri,
        "--method",
        "cibr",
        "--arch",
        "clip-micro-p8-32",
        "--pretrained",
        pretrained,
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-4",
        "--storage",
        str(storage),
        "--run-name",
        name,
        "--log-every",
        "1",
        "--checkpoint-every",
        "100",
        "--set",
        "masking.kind=random",
        "--set",
        "masking.ratio=0.5",
        "--set",
        "cibr.hidden=32",
        "--set",
        "cibr.warmup_steps=1",
        "--set",
        "cibr.warmup_estimator_steps=2",
        "--set",
        "cibr.ramp_steps=2",
        "--set",
        "cibr.lambda=0.5",
        *extra,
    ]


def logged(storage, name: str) -> dict[int, dict]:
    """Each logged step's line; a step logged twice fails."""
    rows = [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]
    assert len({r["step"] for r in rows}) == len(rows), [r["step"] for r in rows]
    return {r["step"]: r for r in rows}


@pytest.fixture(scope="module")
def cibr_runs(small_build, tmp_path_factory):
    """(storage, straight run "straight" of STEPS steps, resumed run "resumed": 2 steps, then
    to STEPS with the --pretrained checkpoint removed first)."""
    root = tmp_path_factory.mktemp("cibr")
    start = str(save_micro_checkpoint(root / "start" / "step_00000001"))
    storage = root / "runs"
    train.main(run_args(small_build[3], storage, "straight", start, "--max-steps", str(STEPS)))
    train.main(run_args(small_build[3], storage, "resumed", start, "--max-steps", "2"))
    shutil.rmtree(root / "start")  # a resume must not need the starting weights again
    train.main(run_args(small_build[3], storage, "resumed", start, "--max-steps", str(STEPS), "--resume"))
    return storage


def test_two_ranks_keep_bit_identical_estimators(cibr_runs):
    directory = checkpoint.fetch_checkpoint(str(cibr_runs / "straight"))
    state = checkpoint.read_state(directory)
    assert state["step"] == STEPS and len(state["auxiliary_rank_digests"]) == 2
    assert len(set(state["auxiliary_rank_digests"])) == 1
    # The digest is of the real saved state: rebuild the objective and load the checkpoint.
    config = checkpoint.load_config(directory)
    model = build_training_model(config, with_weights=False)
    optimizer = build_optimizer(model, config.optim)
    objective = build_training_objective(config, 0, 1, model, torch.device("cpu"), fresh=False)
    checkpoint.load_training_state(
        directory, model, optimizer, build_scheduler(optimizer, 1, 10), parts_of(objective), str(cibr_runs / "straight")
    )
    assert state_digest(parts_of(objective)) == state["auxiliary_rank_digests"][0]
    estimators = parts_of(objective)[1].module
    assert estimators["image"].joint.started and float(estimators["text"].condition.log_mu) != 0.0


def test_every_window_logs_the_estimates_and_lambda_ramps(cibr_runs):
    records = logged(cibr_runs, "straight")
    assert sorted(records) == list(range(1, STEPS + 1))
    for record in records.values():
        for key in ("cibr/A_v", "cibr/C_v", "cibr/A_t", "cibr/C_t", "cibr/R", "cibr/infonce", "loss/cibr"):
            assert math.isfinite(record[key]), (key, record)
    assert [records[s]["cibr/lambda"] for s in range(1, STEPS + 1)] == [0.0, 0.25, 0.5, 0.5, 0.5]


def test_resume_repeats_the_uninterrupted_run_exactly(cibr_runs):
    straight, resumed = logged(cibr_runs, "straight"), logged(cibr_runs, "resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))
    # the resumed attempt started at the saved step 2 (a restart from 0 would log the same losses)
    assert [resumed[s]["start_step"] for s in sorted(resumed)] == [0, 0] + [2] * (STEPS - 2)
    keys = [k for k in straight[STEPS] if k.startswith(("loss/", "cibr/"))]
    for step in range(3, STEPS + 1):
        assert {k: resumed[step][k] for k in keys} == {k: straight[step][k] for k in keys}, step
    # Every tensor of both optimisers and of the estimators ends equal: the EMA and the Adam
    # moments change only gradients, so a reset would show here, not in the losses above.
    a = checkpoint.fetch_checkpoint(str(cibr_runs / "straight"))
    b = checkpoint.fetch_checkpoint(str(cibr_runs / "resumed"))
    for name in (
        "model.safetensors",
        "optimizer.safetensors",
        "auxiliary.estimators.safetensors",
        "auxiliary.estimators.optimizer.safetensors",
    ):
        left, right = load_file(a / name), load_file(b / name)
        assert left.keys() == right.keys() and all(torch.equal(v, right[k]) for k, v in left.items()), name


def test_the_reference_towers_are_stored_once_and_never_exported(cibr_runs, tmp_path):
    run = cibr_runs / "straight"
    assert (run / "reference.safetensors").exists()
    state = checkpoint.read_state(checkpoint.fetch_checkpoint(str(run)))
    assert state["auxiliary"]["reference"]["sha256"] == checkpoint.storage.file_sha256(
        str(run / "reference.safetensors")
    )
    assert not list(run.glob("step_*/auxiliary.reference*"))
    weights = load_file(checkpoint.fetch_checkpoint(str(run)) / "model.safetensors")
    assert all(k.startswith("tower.") for k in weights)
    out = export.export_open_clip(str(run), str(tmp_path / "cibr.pt"))
    exported = torch.load(out, weights_only=True)["state_dict"]
    assert exported.keys() == {k[len("tower.") :] for k in weights}
