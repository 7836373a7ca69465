"""The scale levers together through training/train.py and Ray Train: two workers, bf16
weights with float32 masters, 2 micro-batches, checkpointed and compiled blocks; a resume
continues with the straight run's losses and the checkpoint holds float32 weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from training import checkpoint, train
from tests.test_train_job import logged_lines, run_args, step_losses

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# aot_eager: dynamo and AOT autograd as inductor sees them, without its C++ code generation
# (a minute per worker and run on 2 cores); inductor's numbers are tests/test_compile.py's.

LEVERS = (
    "--set",
    "run.precision=bf16",
    "--set",
    "run.accum_freq=2",
    "--set",
    "run.grad_checkpointing=true",
    "--set",
    "run.compile=true",
    "--set",
    "run.compile_backend=aot_eager",
)


def test_the_levers_train_together_and_resume_exactly(small_build, tmp_path):
    build_uri = small_build[3]
    train.main(run_args(build_uri, tmp_path, "straight", "--max-steps", "4", *LEVERS))
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "2", *LEVERS))
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "4", "--resume", *LEVERS))
    straight, resumed = step_losses(tmp_path, "straight"), step_losses(tmp_path, "resumed", resumed_at=2)
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    assert all(math.isfinite(v) and v > 0 for v in straight.values())
    assert [resumed[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]
    lines = logged_lines(tmp_path, "straight")
    assert all(r["compile/graph_breaks"] == 0 and r["compile/graphs"] >= 2 for r in lines), lines
    directory = checkpoint.fetch_checkpoint(str(tmp_path / "straight"))
    state = checkpoint.read_state(directory)
    assert state["step"] == 4 and state["config"]["run"]["precision"] == "bf16"
    weights = load_file(str(directory / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}
