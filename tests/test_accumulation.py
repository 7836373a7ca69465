"""Gradient accumulation is contrastive-correct: k micro-batches of B give every parameter
(the logit scale included) the gradient of one batch of B·k, for CLIP, FLIP with the same
masks, SmartCLIP's modular loss, Long-CLIP's PCA over all B·k image features and a
non-sphere topology. The reference is a plain forward and backward of the whole batch."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.batches import IMAGES, SHORT_TEXTS, TEXTS
from training.config import apply_overrides
from training.loop import LoopSettings, train_step
from training.methods.recipes import build_method_config
from training.methods.flip import RandomPatchDrop
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_scheduler
from training.towers import build_tokenizer

ARCH = "clip-micro-p8-32"
BATCH, K = 8, 2
METHODS = {
    "clip": ("clip", {}),
    "flip": ("flip", {}),
    "smartclip": ("smartclip", {}),
    "longclip": ("longclip", {"loss.pca_components": 4}),
    "oblique": ("oblique", {"topology.m": 4}),
    "multi": ("multi", {"topology.m": 4}),
}

DRAW_NOISE = RandomPatchDrop.draw_noise

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


def make_batch(context_length: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer(ARCH, context_length)
    words = ["cat", "dog", "bird", "car", "red", "blue", "tree", "house"]
    long = [" ".join(rng.choice(words, 12)) for _ in range(BATCH)]
    return {
        IMAGES: rng.integers(0, 256, (BATCH, 3, 32, 32), dtype=np.uint8),
        TEXTS: tokenizer(long).numpy(),
        SHORT_TEXTS: tokenizer([t.split()[0] for t in long]).numpy(),
    }


class ReplayedNoise:
    """Records each mask draw of the accumulated step, then hands the whole batch the
    concatenation of one micro-batch's draws each (its cached and recomputed forwards draw
    the same noise: checked)."""

    def __init__(self):
        self.draws, self.replay = [], None

    def __call__(self, selector, shape, device):
        if self.replay is not None:
            return self.replay
        noise = torch.rand(shape, device=device, generator=selector.generator)
        self.draws.append(noise)
        return noise

    def whole_batch(self) -> torch.Tensor:
        cached, recomputed = self.draws[:K], self.draws[K:]
        for a, b in zip(cached, recomputed):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        return torch.cat(cached)


def gradients(method: str, overrides: dict, accum_freq: int, rank: int = 0, world: int = 1) -> dict:
    """Every parameter's gradient after one step on this rank's batch (DDP with 2 workers)."""
    config = apply_overrides(
        build_method_config(method), {"model.arch": ARCH, "optim.lr": 1e-3, "loss.learn_temperature": True, **overrides}
    )
    torch.manual_seed(0)
    model = build_training_model(config)
    objective = build_training_objective(config, rank, world, model, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the step keeps the weights
    scheduler = build_scheduler(optimizer, 1, 10)
    batch = make_batch(model.tower.context_length, seed=rank)
    if config.loss.kind != "longclip":
        batch.pop(SHORT_TEXTS)
    settings = LoopSettings(0, 1, 0, rank, world, torch.device("cpu"), grad_clip_norm=1e9, accum_freq=accum_freq)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    train_step(wrapped, objective, optimizer, scheduler, batch, settings, step=0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare(method: str, overrides: dict, rank: int = 0, world: int = 1) -> dict[str, float]:
    """parameter -> max |accumulated − whole-batch gradient| / max |whole-batch gradient|."""
    noise = ReplayedNoise()
    RandomPatchDrop.draw_noise = lambda self, shape, device: noise(self, shape, device)
    try:
        accumulated = gradients(method, overrides, K, rank, world)
        if noise.draws:
            noise.replay = noise.whole_batch()
        whole = gradients(method, overrides, 1, rank, world)
    finally:
        RandomPatchDrop.draw_noise = DRAW_NOISE
    assert set(accumulated) == set(whole) and "tower.logit_scale" in whole
    assert method != "flip" or len(noise.draws) == 2 * K
    return {n: (accumulated[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in whole.items()}


def assert_equal_gradients(errors: dict[str, float]) -> None:
    # float32 sums in another order: tolerance relative to each tensor's own scale
    bad = {n: e for n, e in errors.items() if e > 1e-5}
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(METHODS))
def test_accumulated_gradients_equal_the_whole_batch(name):
    assert_equal_gradients(compare(*METHODS[name]))


def run_two_workers(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {name: compare(*METHODS[name], rank=rank, world=2) for name in sorted(METHODS)}
    finally:
        dist.destroy_process_group()
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))


def test_two_workers_accumulate_the_gradients_of_their_whole_batches(tmp_path):
    """With DDP over 2 gloo workers (no_sync until the last micro-batch), each method."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_two_workers, args=(port, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == sorted(METHODS)
        for errors in results.values():
            assert_equal_gradients(errors)


def test_a_micro_batch_split_must_divide_the_batch():
    with pytest.raises(ValueError, match="does not divide"):
        gradients("clip", {}, 3)


@pytest.mark.parametrize("method, overrides", [("clip", {}), ("pgs0.5", {}), ("multi", {"topology.m": 4})])
def test_gradient_checkpointing_keeps_the_gradients(method, overrides, monkeypatch):
    """Recomputed activations, the same gradients (PGS's masked and the multi-[CLS] paths too);
    every block of both towers really ran under open_clip's checkpoint."""
    import open_clip.transformer

    plain = gradients(method, overrides, 1)
    calls, original = [], open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint", lambda *a, **kw: calls.append(a[0]) or original(*a, **kw))
    checkpointed = gradients(method, {**overrides, "run.grad_checkpointing": True}, 1)
    config = apply_overrides(build_method_config(method), {"model.arch": ARCH, **overrides})
    tower = build_training_model(config).tower
    assert len(calls) == len(tower.visual.transformer.resblocks) + len(tower.transformer.resblocks)
    assert_equal_gradients(
        {n: (checkpointed[n] - g).abs().max().item() / (g.abs().max().item() + 1e-12) for n, g in plain.items()}
    )


def test_cibr_accumulates_with_its_estimators_on_every_row(tmp_path):
    """CIBR fine-tunes a checkpoint the test writes; λ = 0.5 from the first step, so the
    regulariser's gradient is in every parameter's, and its estimators update once on all B·k
    features (reading a micro-batch only, they would differ, and so would the gradients)."""
    from tests.eval_fixtures import save_micro_checkpoint

    start = str(save_micro_checkpoint(tmp_path / "start"))
    overrides = {
        "model.pretrained": start,
        "cibr.hidden": 32,
        "cibr.warmup_steps": 0,
        "cibr.ramp_steps": 0,
        "cibr.lambda": 0.5,
        "loss.init_logit_scale": 2.0,
    }
    assert_equal_gradients(compare("cibr", overrides))


def test_pgs_selects_per_micro_batch_and_recomputes_the_same_selection(monkeypatch):
    """PGS under accumulation (documented in PGSConfig): each micro-batch selects from its own
    B/k images, so the gradient is not the whole batch's; the recomputation with grad selects
    exactly what the cached forward selected (each micro-batch's draws are reseeded)."""
    import training.methods.pgs as pgs

    kept, encode = [], pgs.encode_selected_tokens
    monkeypatch.setattr(
        pgs,
        "encode_selected_tokens",
        lambda visual, tokens, selection: (
            kept.append(selection.keep_index.clone()) or encode(visual, tokens, selection)
        ),
    )
    grads = gradients("pgs0.5", {}, K)
    assert [k.shape[0] for k in kept] == [BATCH // K] * (2 * K)  # K cached forwards, then K recomputed
    for cached, recomputed in zip(kept[:K], kept[K:]):
        assert torch.equal(cached, recomputed)
    assert all(torch.isfinite(g).all() for g in grads.values()) and "tower.logit_scale" in grads
