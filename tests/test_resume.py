"""training/resume.py without Ray: what a resume must match of the checkpoint it continues."""

from __future__ import annotations

import pytest

from training import data_mixture, resume
from training.data_order import Source
from training.config import apply_overrides, config_to_dict
from training.methods.recipes import build_method_config


def saved(config, digest: str = "d1", step: int = 40) -> dict:
    """A state.json from before mixtures (one build, one digest): what resumes must still read."""
    return {"step": step, "config": config_to_dict(config), "manifest_digest": digest, "data_uri": "b"}


def built(*pairs) -> list[Source]:
    return [Source(f"s3://b/{digest}", weight, [], digest) for digest, weight in pairs]


ONE = built(("d1", 1.0))


@pytest.fixture
def config():
    return apply_overrides(build_method_config("flip"), {"data.builds": ("b",), "run.num_workers": 4})


def test_free_fields_may_change_and_each_guarded_one_is_named_by_its_category(config):
    free = apply_overrides(
        config,
        {
            "run.max_steps": 900,
            "run.log_every": 1,
            "run.max_failures": 3,
            "data.preprocess_concurrency": 3,
            "run.placement_strategy": "SPREAD",
        },
    )
    assert resume.resume_differences(saved(config), free, ONE) == {}
    changes = {
        "data.caption_policy": "long",
        "masking.ratio": 0.3,
        "model.arch": "ViT-B-32",
        "data.batch_size_per_worker": 8,
        "optim.lr": 1e-2,
    }
    found = resume.resume_differences(saved(config), apply_overrides(config, changes), built(("d2", 1.0)))
    assert set(found) == {"data", "method", "architecture", "batch", "schedule"}
    assert found["data"][0] == "builds: b (sha256 d1, weight 1) -> s3://b/d2 (sha256 d2, weight 1)"
    assert found["batch"] == ["data.batch_size_per_worker: 64 -> 8"]


def test_check_resume_refuses_unless_the_change_is_allowed(config):
    fewer = apply_overrides(config, {"run.num_workers": 2})
    with pytest.raises(SystemExit, match="run.num_workers: 4 -> 2") as refused:
        resume.check_resume(saved(config), fewer, ONE)
    assert "different sequence of global batches" in str(refused.value) and "--allow-change batch" in str(refused.value)
    resume.check_resume(saved(config), fewer, ONE, allowed=("batch",))


def test_a_mixture_resumes_only_with_the_same_builds_and_weights(config):
    """Every manifest digest and weight, in order, must match; the URIs may change (the
    same build copied to S3)."""
    mixture = built(("d1", 0.7), ("d2", 0.3))
    state = {**saved(config), **data_mixture.describe_sources(mixture)}
    moved = [Source("/local/copy/" + s.digest, s.weight, [], s.digest) for s in mixture]
    assert resume.resume_differences(state, config, moved) == {}
    for changed in (
        built(("d1", 0.6), ("d2", 0.4)),
        built(("d2", 0.3), ("d1", 0.7)),
        built(("d1", 1.0)),
        built(("d1", 0.5), ("d2", 0.3), ("d3", 0.2)),
    ):
        (line,) = resume.resume_differences(state, config, changed)["data"]
        assert "weight 0.7" in line.split(" -> ")[0], line
    with pytest.raises(SystemExit, match="--allow-change data"):
        resume.check_resume(state, config, built(("d1", 0.6), ("d2", 0.4)))


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


@pytest.mark.parametrize("method", ["clip", "pgs0.5"])
def test_run_compile_and_the_pgs_compaction_it_picks_may_change_on_resume(method):
    """A run saved before pgs.compaction had `auto` holds batch_min; compiling it on resume (or
    stopping to) changes only how many hidden tokens leave PGS's sequence, never a loss."""
    from training.methods.recipes import resolve_auto_fields

    base = apply_overrides(build_method_config(method), {"data.builds": ("b",)})
    old = resolve_auto_fields(apply_overrides(base, {"pgs.compaction": "batch_min"}))  # stop 32 saved this
    for compiled in (False, True):
        now = resolve_auto_fields(apply_overrides(base, {"run.compile": compiled}))
        assert resume.resume_differences(saved(old), now, ONE) == {}
    assert resume.resume_differences(saved(old), apply_overrides(old, {"pgs.mode": "paper"}), ONE)  # others still
