"""SmartCLIP and Long-CLIP through training/train.py (Ray Train, two workers, gather with
gradients), fine-tuning from a checkpoint the test writes; the checkpoint then scores with
the plain and the masked scorer at the stretched context."""

from __future__ import annotations

import json

import pytest
import torch

from training import checkpoint, train
from training.config import apply_overrides
from training.inference import load_inference_model
from training.methods.recipes import build_method_config
from training.model import build_training_model
from training.optim import build_optimizer, build_scheduler

pytestmark = pytest.mark.ray

ARCH = "clip-micro-p8-32"


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> str:
    """A plain CLIP checkpoint of this project to fine-tune from."""
    directory = tmp_path_factory.mktemp("start") / "step_00000001"
    config = apply_overrides(build_method_config("clip"), {"model.arch": ARCH})
    torch.manual_seed(5)
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    checkpoint.save_checkpoint(directory, model, optimizer, build_scheduler(optimizer, 1, 2), 1, config, {})
    return str(directory)


def run_args(build_uri: str, storage, method: str, pretrained: str) -> list[str]:
    return [
        "--data",
        build_uri,
        "--method",
        method,
        "--arch",
        ARCH,
        "--pretrained",
        pretrained,
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--warmup-steps",
        "1",
        "--storage",
        str(storage),
        "--run-name",
        method,
        "--log-every",
        "1",
        "--checkpoint-every",
        "100",
        "--max-steps",
        "3",
    ]


def logged(storage, name: str) -> list[dict]:
    return [json.loads(line) for line in (storage / name / "metrics.jsonl").read_text().splitlines()]


def test_smartclip_fine_tune_logs_density_and_scores_both_ways(small_build, start_checkpoint, tmp_path):
    train.main(run_args(small_build[3], tmp_path, "smartclip", start_checkpoint))
    rows = logged(tmp_path, "smartclip")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0.0 <= r["mask_density"] <= 1.0 and r["loss/align"] > 0 and r["loss/sparsity"] > 0 for r in rows)
    start = checkpoint.tower_state_dict(checkpoint.fetch_checkpoint(start_checkpoint))
    for scorer in ("plain", "masked"):
        bundle = load_inference_model(str(tmp_path / "smartclip"), scorer=scorer)
        assert bundle.info["scorer"] == scorer and bundle.info["step"] == 3
        tokens = bundle.tokenizer(["a red circle", "a blue square"])
        assert tokens.shape == (2, 248)
        with torch.no_grad():
            scores = bundle.similarity(
                bundle.model.encode_image(torch.zeros(1, 3, 32, 32)), bundle.model.encode_text(tokens)
            )
        assert scores.shape == (1, 2) and torch.isfinite(scores).all()
    tuned = checkpoint.tower_state_dict(checkpoint.fetch_checkpoint(str(tmp_path / "smartclip")))
    assert torch.equal(tuned["positional_embedding"][:20], start["positional_embedding"][:20])  # frozen


def test_longclip_fine_tune_trains_on_two_captions(small_build, start_checkpoint, tmp_path):
    train.main(run_args(small_build[3], tmp_path, "longclip", start_checkpoint))
    rows = logged(tmp_path, "longclip")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss/long"] > 0 and r["loss/short"] > 0 for r in rows)
