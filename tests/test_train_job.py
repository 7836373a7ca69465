"""training/train.py through Ray Train: a two-worker run, resume equality, the run guard."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipelines import shards
from pipelines.demo_corpus import KARPATHY_JSON
from tests.test_in_run_eval import evaluation_job_figures
from training import checkpoint, train
from training.inference import load_inference_model

pytestmark = pytest.mark.ray


# The shards' sizes depend on the mirror's port (it is in every URL, hence every key), so
# the small build uses 6-image shards and 4-image batches: a worker then always has whole
# batches for many more steps than the six these tests run.
def run_args(build_uri: str | list[str], storage, name: str, *extra: str) -> list[str]:
    builds = [build_uri] if isinstance(build_uri, str) else build_uri
    return [
        "--data",
        *builds,
        "--method",
        "flip",
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
        *extra,
    ]


def logged_lines(storage, name: str) -> list[dict]:
    return [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]


def step_losses(storage, name: str, resumed_at: int = 0) -> dict[int, float]:
    """Loss by step, checking that each step was logged once, by the attempt that started at
    `resumed_at` for every step after it (a resume that silently restarted from step 0 would
    log the same deterministic losses, but with start_step 0)."""
    lines = logged_lines(storage, name)
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    assert all(r["start_step"] == (resumed_at if r["step"] > resumed_at else 0) for r in lines), lines
    return {r["step"]: r["loss/total"] for r in lines}


@pytest.fixture(scope="module")
def straight_run(small_build, tmp_path_factory):
    """Six steps, with Weights & Biases in offline mode (its files under <storage>/wandb) and
    in-run evaluation every 4 steps on the small corpus's zero-shot and retrieval splits."""
    storage = tmp_path_factory.mktemp("runs")
    corpus = small_build[0]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_DIR", str(storage))
        result = train.main(
            run_args(
                small_build[3],
                storage,
                "straight",
                "--max-steps",
                "6",
                "--set",
                "run.wandb_project=clipforge-test",
                "--eval-every",
                "4",
                "--eval-set",
                f"scenes=image_folder:{corpus.zeroshot_dir}",
                "--eval-set",
                f"shots=karpathy:{corpus.retrieval_dir / KARPATHY_JSON}",
            )
        )
    return storage, result


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (LevelDB log framing: a 7-byte file header, then 32 KiB
    blocks of records, each with a 7-byte header: crc, length, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, records = path.read_bytes(), 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending, pos = pending + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_weights_and_biases_gets_every_logged_line(straight_run):
    storage, _ = straight_run
    (run_file,) = (storage / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == "clipforge-test" and run.display_name == "straight"
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    lines = {r["step"]: r for r in logged_lines(storage, "straight")}
    assert [h["_step"] for h in history] == sorted(lines) == [1, 2, 3, 4, 5, 6]
    for h in history:
        assert h["loss/total"] == pytest.approx(lines[h["_step"]]["loss/total"])
        assert h["samples_per_s"] > 0


def test_two_worker_run_trains_and_checkpoints(straight_run):
    storage, result = straight_run
    losses = step_losses(storage, "straight")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert all(v == v and v > 0 for v in losses.values())
    directory = checkpoint.fetch_checkpoint(str(storage / "straight"))
    state = checkpoint.read_state(directory)
    assert state["step"] == 6 and state["config"]["method"] == "flip"
    assert state["manifest_digests"][0] and state["data_weights"] == [1.0] and state["data_uris"]


def test_in_run_evaluation_logs_the_evaluation_jobs_figures_every_n_steps(small_build, straight_run):
    """Both workers embed their shares of each set at steps 4 and 6 (the last); what rank 0
    logs at step 6 is what the evaluation job reports for the step-6 checkpoint."""
    storage, _ = straight_run
    corpus, lines = small_build[0], {r["step"]: r for r in logged_lines(storage, "straight")}
    evaluated = sorted(step for step, r in lines.items() if any(k.startswith("eval/") for k in r))
    assert evaluated == [4, 6]
    assert lines[6]["eval/seconds"] > 0
    uri = str(checkpoint.fetch_checkpoint(str(storage / "straight")))
    zeroshot = evaluation_job_figures(
        uri,
        {"name": "scenes", "task": "zeroshot", "test": {"format": "image_folder", "path": str(corpus.zeroshot_dir)}},
    )
    retrieval = evaluation_job_figures(
        uri,
        {
            "name": "shots",
            "task": "retrieval",
            "test": {"format": "karpathy", "path": str(corpus.retrieval_dir / KARPATHY_JSON)},
        },
    )
    for prefix, figures in (("scenes", zeroshot), ("shots", retrieval)):
        keys = [k for k in figures if k.startswith(("top", "mean_per_class", "image_retrieval", "text_retrieval"))]
        assert keys
        for key in keys:
            assert lines[6][f"eval/{prefix}/{key}"] == pytest.approx(figures[key], abs=1e-6), key


def test_resume_continues_with_the_same_losses(small_build, straight_run, tmp_path):
    storage, _ = straight_run
    build_uri = small_build[3]
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "3"))
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:  # as an attempt killed after step 3 leaves it
        f.write(json.dumps({"step": 4, "start_step": 0, "loss/total": 99.0}) + "\n")
    train.main(run_args(build_uri, tmp_path, "resumed", "--max-steps", "6", "--resume"))
    straight, resumed = step_losses(storage, "straight"), step_losses(tmp_path, "resumed", resumed_at=3)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [straight[s] for s in (4, 5, 6)]
    assert checkpoint.read_state(checkpoint.fetch_checkpoint(str(tmp_path / "resumed")))["step"] == 6


def test_resume_refuses_changed_settings_and_a_checkpoint_ray_does_not_restore(small_build, straight_run, tmp_path):
    build_uri = small_build[3]
    # The run to resume shards with FSDP2 (its losses are DDP's, and the sharding may change at
    # a resume: the checkpoint is the same either way); a run of its own would cost half a minute.
    train.main(run_args(build_uri, tmp_path, "guarded", "--max-steps", "2", "--set", "run.sharding=fsdp"))
    straight, sharded = step_losses(straight_run[0], "straight"), step_losses(tmp_path, "guarded")
    assert [sharded[s] for s in (1, 2)] == pytest.approx([straight[s] for s in (1, 2)], rel=1e-5)
    state = checkpoint.read_state(checkpoint.fetch_checkpoint(str(tmp_path / "guarded")))
    assert state["config"]["run"]["sharding"] == "fsdp" and state["step"] == 2
    with pytest.raises(SystemExit) as refused:
        train.main(
            run_args(
                build_uri, tmp_path, "guarded", "--max-steps", "4", "--resume", "--lr", "2e-3", "--num-workers", "1"
            )
        )
    message = str(refused.value)
    assert "optim.lr: 0.001 -> 0.002" in message and "run.num_workers: 2 -> 1" in message
    assert "different sequence of global batches" in message
    assert "--allow-change batch" in message and "--allow-change schedule" in message
    # Ray Train finds a run's checkpoints through its snapshot file: without it, it restores none
    (tmp_path / "guarded" / "checkpoint_manager_snapshot.json").unlink()
    with pytest.raises(Exception, match="has a checkpoint at step 2, but Ray Train restored no checkpoint"):
        train.main(run_args(build_uri, tmp_path, "guarded", "--max-steps", "4", "--resume"))


def test_new_run_refuses_to_overwrite_and_resume_needs_a_run(small_build, straight_run, tmp_path):
    storage, _ = straight_run
    with pytest.raises(SystemExit, match="--resume"):
        train.main(run_args(small_build[3], storage, "straight"))
    with pytest.raises(SystemExit, match="no checkpoint"):
        train.main(run_args(small_build[3], tmp_path, "never-ran", "--resume"))


def subset_build(build_uri: str, target: Path, n_shards: int) -> str:
    """Another build: the first shards of `build_uri`, copied, under a manifest of their own."""
    manifest = shards.read_manifest(build_uri)
    entries = manifest["shards"][:n_shards]
    for entry in entries:
        (target / entry["tar"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(build_uri) / entry["tar"], target / entry["tar"])
    (target / shards.MANIFEST).write_text(json.dumps({**manifest, "shards": entries}))
    return str(target)


def test_a_mixture_of_two_builds_trains_records_both_and_resumes(small_build, straight_run, tmp_path):
    """`--data A:0.7 B:0.3` through Ray Train: the checkpoint and the evaluation job's model
    record both manifests and weights; a resume with other weights is refused, one with the
    same continues from its step."""
    other = subset_build(small_build[3], tmp_path / "other", 3)
    mix = [f"{small_build[3]}:0.7", f"{other}:0.3"]
    train.main(run_args(mix, tmp_path, "mixed", "--max-steps", "2"))
    state = checkpoint.read_state(checkpoint.fetch_checkpoint(str(tmp_path / "mixed")))
    digests = [shards.manifest_digest(shards.read_manifest(u)) for u in (small_build[3], other)]
    assert state["manifest_digests"] == digests and state["data_weights"] == [0.7, 0.3]
    info = load_inference_model(str(tmp_path / "mixed")).info
    assert info["manifest_digests"] == digests and info["data_weights"] == [0.7, 0.3]
    with pytest.raises(SystemExit, match="weight 0.7.*-> .*weight 0.5") as refused:
        train.main(run_args([f"{small_build[3]}:1", f"{other}:1"], tmp_path, "mixed", "--max-steps", "3", "--resume"))
    assert "--allow-change data" in str(refused.value)
    train.main(run_args(mix, tmp_path, "mixed", "--max-steps", "3", "--resume"))
    assert sorted(step_losses(tmp_path, "mixed", resumed_at=2)) == [1, 2, 3]
