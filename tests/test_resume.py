"""training/resume.py without Ray: what a resume must match of the checkpoint it continues."""
from __future__ import annotations

import pytest

from training import resume
from training.config import apply_overrides, config_to_dict
from training.methods import build_method_config


def saved(config, digest: str = "d1", step: int = 40) -> dict:
    return {"step": step, "config": config_to_dict(config), "manifest_digest": digest, "data_uri": "b"}


@pytest.fixture
def config():
    return apply_overrides(build_method_config("flip"), {"data.build_uri": "b", "run.num_workers": 4})


def test_free_fields_may_change_and_each_guarded_one_is_named_by_its_category(config):
    free = apply_overrides(config, {"run.max_steps": 900, "run.log_every": 1, "run.max_failures": 3,
                                    "data.preprocess_concurrency": 3, "run.placement_strategy": "SPREAD"})
    assert resume.resume_differences(saved(config), free, "d1") == {}
    changes = {"data.caption_policy": "long", "masking.ratio": 0.3, "model.arch": "ViT-B-32",
               "data.batch_size_per_worker": 8, "optim.lr": 1e-2}
    found = resume.resume_differences(saved(config), apply_overrides(config, changes), "d2")
    assert set(found) == {"data", "method", "architecture", "batch", "schedule"}
    assert any("build manifest" in d for d in found["data"])
    assert found["batch"] == ["data.batch_size_per_worker: 64 -> 8"]


def test_check_resume_refuses_unless_the_change_is_allowed(config):
    fewer = apply_overrides(config, {"run.num_workers": 2})
    with pytest.raises(SystemExit, match="run.num_workers: 4 -> 2") as refused:
        resume.check_resume(saved(config), fewer, "d1")
    assert "different sequence of global batches" in str(refused.value) and "--allow-change batch" in str(refused.value)
    resume.check_resume(saved(config), fewer, "d1", allowed=("batch",))


def test_a_worker_must_start_at_the_runs_latest_checkpoint():
    resume.check_restored(40, 40, "runs/x")
    resume.check_restored(60, 40, "runs/x")  # a worker-group restart after a later checkpoint
    with pytest.raises(RuntimeError, match="restored no checkpoint"):
        resume.check_restored(0, 40, "runs/x")
    with pytest.raises(RuntimeError, match="restored the checkpoint of step 20"):
        resume.check_restored(20, 40, "runs/x")


def test_the_latest_saved_state_is_the_highest_step(tmp_path):
    import json
    for step in (4, 12, 8):
        (tmp_path / "r" / f"step_{step:08d}").mkdir(parents=True)
        (tmp_path / "r" / f"step_{step:08d}" / "state.json").write_text(json.dumps({"step": step}))
    assert resume.latest_saved_state(str(tmp_path / "r"))["step"] == 12
    assert resume.check_run_state(str(tmp_path / "none"), "none", resume=False) is None
    with pytest.raises(SystemExit, match="already has checkpoints"):
        resume.check_run_state(str(tmp_path / "r"), "r", resume=False)
    with pytest.raises(SystemExit, match="no checkpoint"):
        resume.check_run_state(str(tmp_path / "none"), "none", resume=True)
