"""The per-worker loop on synthetic prepared batches, without Ray: what it reports and when,
that it learns, and that a run resumed from a checkpoint repeats the straight run's losses
exactly (the FLIP masks are reseeded from (seed, step, rank))."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.batches import IMAGES, TEXTS
from training.checkpoint import load_training_state, save_checkpoint
from training.config import apply_overrides, temperature_of
from training.loop import LoopSettings, run_training
from training.methods.clip.loss import ContrastiveLoss
from training.methods.recipes import build_method_config
from training.model import build_model
from training.optim import compute_lr_factor, build_optimizer, build_scheduler
from training.towers import build_tokenizer

ARCH = "clip-micro-p8-32"
CONFIG = apply_overrides(build_method_config("flip"), {"model.arch": ARCH, "optim.lr": 1e-3})
REPORT_KEYS = {
    "loss/contrastive",
    "loss/total",
    "logit_scale",
    "temperature",
    "lr",
    "samples_per_s",
    "data_wait_fraction",
    "grad_norm",
}


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


def make_batches(num_batches: int, batch_size: int = 4, seed: int = 0) -> list[dict]:
    """Prepared batches as the data pipeline hands them over: uint8 images, token ids."""
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer(ARCH)
    batches = []
    for b in range(num_batches):
        captions = [f"picture {b} {i} of a {['cat', 'dog', 'bird', 'car'][i % 4]}" for i in range(batch_size)]
        batches.append(
            {IMAGES: rng.integers(0, 256, (batch_size, 3, 32, 32), dtype=np.uint8), TEXTS: tokenizer(captions).numpy()}
        )
    return batches


# Every topology on the same loop (multi's extra [CLS] parameters must round-trip too).
TOPOLOGY_OVERRIDES = {
    "sphere": {},
    "oblique": {"topology.kind": "oblique", "topology.m": 4},
    "multi": {"topology.kind": "multi", "topology.m": 4},
    "oblique_geodesic": {"topology.kind": "oblique_geodesic", "topology.m": 4},
    "euclidean": {"topology.kind": "euclidean"},
}


def build_parts(total_steps: int, init_seed: int = 0, warmup_steps: int = 2, config=CONFIG):
    torch.manual_seed(init_seed)
    model = build_model(
        config.model, config.masking, temperature_of(config.loss, config.topology), topology=config.topology
    )
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps)
    return model, ContrastiveLoss(topology=model.topology), optimizer, scheduler


def settings(start_step: int, total_steps: int, **kwargs) -> LoopSettings:
    return LoopSettings(
        start_step=start_step,
        total_steps=total_steps,
        seed=7,
        rank=0,
        world_size=1,
        device=torch.device("cpu"),
        **kwargs,
    )


class Recorder:
    """The report callback: every (step, metrics, checkpoint) call, in order."""

    def __init__(self):
        self.calls: list[tuple[int, dict, bool]] = []

    def __call__(self, step: int, metrics: dict, want_checkpoint: bool) -> None:
        self.calls.append((step, dict(metrics), want_checkpoint))

    def losses(self) -> dict[int, float]:
        return {step: metrics["loss/total"] for step, metrics, _ in self.calls}


def test_reports_at_log_steps_and_checkpoints_with_expected_keys():
    model, objective, optimizer, scheduler = build_parts(total_steps=7)
    recorder = Recorder()
    run_training(
        model,
        objective,
        optimizer,
        scheduler,
        make_batches(7),
        settings(0, 7, log_every=2, checkpoint_every=3),
        recorder,
    )
    assert [(step, ckpt) for step, _, ckpt in recorder.calls] == [
        (2, False),
        (3, True),
        (4, False),
        (6, True),
        (7, True),
    ]  # the last step checkpoints
    for step, metrics, _ in recorder.calls:
        assert REPORT_KEYS <= metrics.keys(), step
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        assert metrics["loss/total"] == pytest.approx(metrics["loss/contrastive"])
        assert metrics["temperature"] == pytest.approx(1 / metrics["logit_scale"])
        assert metrics["samples_per_s"] > 0 and 0 <= metrics["data_wait_fraction"] <= 1
    # lr is the rate the reported step used: step index 6 of 7, warmup 2 (before its
    # scheduler step), not the next step's rate.
    expected = CONFIG.optim.lr * compute_lr_factor(6, 2, 7)
    assert recorder.calls[-1][1]["lr"] == pytest.approx(expected)
    assert expected != pytest.approx(scheduler.get_last_lr()[0])


def test_loss_decreases_on_a_fixed_batch():
    steps = 30
    model, objective, optimizer, scheduler = build_parts(total_steps=steps, warmup_steps=3)
    recorder = Recorder()
    batch = make_batches(1, batch_size=8)[0]
    run_training(model, objective, optimizer, scheduler, [batch] * steps, settings(0, steps, log_every=1), recorder)
    losses = [recorder.losses()[s] for s in range(1, steps + 1)]
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert first > 0.5 * math.log(8)  # starts near chance level for 8 pairs
    assert last < 0.25 * first, losses


@pytest.mark.parametrize("kind", sorted(TOPOLOGY_OVERRIDES))
def test_resumed_run_repeats_the_straight_run_exactly(tmp_path, kind):
    total = 6
    batches = make_batches(total)
    config = apply_overrides(CONFIG, TOPOLOGY_OVERRIDES[kind])

    straight = Recorder()
    run_training(*build_parts(total, config=config), batches, settings(0, total, log_every=1), straight)

    # First half, checkpointed at its last step through the report callback (as train.py does).
    model, objective, optimizer, scheduler = build_parts(total, config=config)
    first_half = Recorder()

    def report_and_save(step, metrics, want_checkpoint):
        first_half(step, metrics, want_checkpoint)
        if want_checkpoint:
            save_checkpoint(tmp_path / f"step_{step}", model, optimizer, scheduler, step, config, {})

    run_training(model, objective, optimizer, scheduler, batches[:3], settings(0, 3, log_every=1), report_and_save)
    assert first_half.calls[-1][0] == 3 and first_half.calls[-1][2]

    # Second half: fresh objects with another init, state from the checkpoint only.
    model, objective, optimizer, scheduler = build_parts(total, init_seed=123, config=config)
    assert load_training_state(tmp_path / "step_3", model, optimizer, scheduler)["step"] == 3
    second_half = Recorder()
    run_training(model, objective, optimizer, scheduler, batches[3:], settings(3, total, log_every=1), second_half)

    assert [s for s, _, _ in second_half.calls] == [4, 5, 6]
    want, got = straight.losses(), {**first_half.losses(), **second_half.losses()}
    assert got == want  # bitwise: same masks, same optimizer state, same schedule
    for key in ("logit_scale", "grad_norm", "lr"):
        assert [m[key] for _, m, _ in second_half.calls] == [m[key] for _, m, _ in straight.calls[3:]]


def test_masks_depend_on_the_step():
    """Reseeding per step must not repeat one mask: two steps on the same batch from the same
    weights give different losses only through different FLIP masks."""
    batch = make_batches(1)[0]
    losses = []
    for start in (0, 1):
        model, objective, optimizer, scheduler = build_parts(total_steps=start + 1)
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # keep weights fixed; only the mask seed changes
        recorder = Recorder()
        scheduler.step = lambda: None  # keep lr at 0
        run_training(model, objective, optimizer, scheduler, [batch], settings(start, start + 1, log_every=1), recorder)
        losses.append(recorder.losses()[start + 1])
    assert losses[0] != losses[1]
