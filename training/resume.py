"""Resume that cannot lie: a new run never continues an old one, a resume continues exactly
the run it names (same data, method, architecture, batch plan and schedule unless the user
allows a change), and a worker that Ray Train hands no checkpoint, or an older one than the run
has, fails instead of training from step 0.

The data order is a function of the worker count (each worker reads its own shards,
training/data_order.py), so a run resumed on fewer or more workers would continue a different
sequence of global batches: that is refused like any other change of the batch plan, and
`--allow-change batch` accepts it (the new order from the saved step on; the epoch in progress
then sees some samples twice and others not at all)."""

from __future__ import annotations

import json

from pipelines import storage
from training import checkpoint, data_mixture
from training.config import TrainConfig, config_from_dict, config_to_dict

# What a resume must match, by the name `--allow-change` uses. Fields not listed (max_steps,
# log and checkpoint cadence, failures, devices, data-loader parallelism) may change freely.
RESUME_FIELDS = {
    "data": ("data.crop_scale", "data.caption_policy", "data.long_caption_fraction"),
    "method": ("method", "masking.", "pgs.", "topology.", "loss.", "smartclip.", "cibr."),
    "architecture": ("model.arch", "model.text_positions_kept", "model.text_stretch_factor", "model.trainable"),
    "batch": ("run.num_workers", "data.batch_size_per_worker"),
    "schedule": ("optim.", "run.epochs", "run.seed"),
}
CHANGES = tuple(RESUME_FIELDS)
# Fields inside those sections that change no result: PGS's compaction decides only how many
# hidden tokens leave the sequence physically (the same losses either way, test_pgs_model),
# and follows run.compile, which may change on resume.
FREE_FIELDS = ("pgs.compaction",)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def category_of(field: str) -> str | None:
    if field in FREE_FIELDS:
        return None
    for category, names in RESUME_FIELDS.items():
        if any(field == n or (n.endswith(".") and field.startswith(n)) for n in names):
            return category
    return None


def resume_differences(saved: dict, config: TrainConfig, sources) -> dict[str, list[str]]:
    """category -> ["field: saved -> now", ...] of what differs from the saved state.json
    (the data: every build's manifest digest and weight, in order; not its URI)."""
    before = flatten(config_to_dict(config_from_dict(saved["config"])))  # today's defaults filled in
    now = flatten(config_to_dict(config))
    found: dict[str, list[str]] = {}
    if changed := data_mixture.source_differences(saved, sources):
        found["data"] = changed
    for field in sorted(set(before) | set(now)):
        category = category_of(field)
        if category and json.dumps(before.get(field)) != json.dumps(now.get(field)):
            found.setdefault(category, []).append(f"{field}: {before.get(field)!r} -> {now.get(field)!r}")
    return found


def check_resume(saved: dict, config: TrainConfig, sources, allowed=()) -> None:
    """SystemExit naming every difference from the saved run that `allowed` does not accept."""
    found = {c: d for c, d in resume_differences(saved, config, sources).items() if c not in allowed}
    if not found:
        return
    lines = [f"  {category}: {d}" for category, details in found.items() for d in details]
    if "run.num_workers" in " ".join(found.get("batch", [])):
        lines.append(
            "  (the data order depends on the worker count: with another count the run would continue "
            "a different sequence of global batches from the saved step)"
        )
    raise SystemExit(
        f"--resume of run {config.run.name!r} at step {saved['step']} would change what it trains:\n"
        + "\n".join(lines)
        + "\npass the same settings, or accept the change with "
        + " ".join(f"--allow-change {c}" for c in found)
    )


def saved_states(run_dir: str) -> list[dict]:
    """state.json of every checkpoint of the run (state.json is written last: complete ones)."""
    fs, path = storage.open_storage(run_dir)
    if not fs.exists(path):
        return []
    files = sorted(fs.glob(storage.join(path, "step_*", checkpoint.STATE_FILE)))
    return [json.loads(storage.read_bytes(fs, f)) for f in files]


def latest_saved_state(run_dir: str) -> dict | None:
    states = saved_states(run_dir)
    return max(states, key=lambda s: s["step"]) if states else None


def check_run_state(run_dir: str, name: str, resume: bool) -> dict | None:
    """The latest saved state of a run to resume (None for a new run); a new run must not
    silently continue an old one, nor a resume start from scratch."""
    latest = latest_saved_state(run_dir)
    if latest is not None and not resume:
        raise SystemExit(
            f"run {name!r} already has checkpoints under {run_dir}; "
            "pass --resume to continue it or choose another --run-name"
        )
    if resume and latest is None:
        raise SystemExit(f"--resume: no checkpoint of run {name!r} under {run_dir}")
    return latest


def check_restored(restored_step: int, expected_step: int, run_dir: str) -> None:
    """A worker of a resume must start at the run's latest checkpoint (or later, after a
    worker-group restart), never at an older one or from scratch."""
    if restored_step < expected_step:
        got = "no checkpoint" if restored_step == 0 else f"the checkpoint of step {restored_step}"
        raise RuntimeError(
            f"--resume: run {run_dir} has a checkpoint at step {expected_step}, but Ray Train restored {got} "
            "(its checkpoint_manager_snapshot.json there is missing, unreadable or older than the "
            "checkpoints); refusing to train the run again from an earlier step"
        )
