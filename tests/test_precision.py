"""run.precision: fp32, bf16 autocast, and bf16 weights with float32 master weights, whose
updates survive the 1e-6 learning rates of the fine-tuning recipes (a bfloat16 weight alone
absorbs none of them)."""

from __future__ import annotations

import copy

import pytest
import torch

from training.config import apply_overrides
from training.loop import LoopSettings, train_step
from training.methods.recipes import build_method_config, check_combination
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.precision import MasterWeights, resolve_precision
from tests.test_accumulation import ARCH, make_batch

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest
CPU = torch.device("cpu")


def build(lr: float, method: str = "clip"):
    config = apply_overrides(build_method_config(method), {"model.arch": ARCH, "optim.lr": lr, "optim.warmup_steps": 1})
    torch.manual_seed(0)
    model = build_training_model(config)
    objective = build_training_objective(config, 0, 1, model, CPU)
    optimizer = build_optimizer(model, config.optim)
    return model, objective, optimizer, build_scheduler(optimizer, 1, 100)


def run_steps(precision: str, lr: float, steps: int = 3, accum_freq: int = 1, method: str = "clip"):
    model, objective, optimizer, scheduler = build(lr, method)
    start = copy.deepcopy(model.state_dict())
    weights = MasterWeights(model) if precision == "bf16" else None
    settings = LoopSettings(0, steps, 0, 0, 1, CPU, bf16=precision == "amp_bf16", accum_freq=accum_freq)
    batch = make_batch(model.tower.context_length)
    if method != "longclip":
        batch.pop("short_texts", None)
    losses = []
    for step in range(steps):
        metrics = train_step(
            weights.compute if weights else model,
            objective,
            optimizer,
            scheduler,
            batch,
            settings,
            step=step,
            weights=weights,
        )
        losses.append(float(metrics["loss/total"]))
    return model, weights, start, losses


def test_auto_is_bf16_autocast_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", torch.device("cuda")) == "amp_bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    with pytest.raises(ValueError, match="unknown run.precision"):
        check_combination(apply_overrides(build_method_config("clip"), {"run.precision": "fp16"}))


def test_bf16_with_master_weights_keeps_updates_that_bf16_weights_lose():
    model, weights, start, _ = run_steps("bf16", lr=1e-6)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), start[n])]
    assert len(moved) >= len(list(model.parameters())) - 2, "the float32 masters took the 1e-6 updates"
    for master, compute in weights.pairs:  # the compute copy follows the masters
        assert compute.dtype == torch.bfloat16
        torch.testing.assert_close(compute.detach(), master.detach().to(torch.bfloat16), rtol=0, atol=0)
    # The failure mode the masters exist for: the same tiny step taken on bfloat16 weights.
    plain = {n: v.to(torch.bfloat16) for n, v in start.items() if v.is_floating_point()}
    stepped = {
        n: (v.float() + (model.state_dict()[n] - start[n])).to(torch.bfloat16)
        for n, v in plain.items()
        if n.endswith("weight") and v.ndim >= 2
    }
    unchanged = sum(int((stepped[n] == plain[n]).sum()) for n in stepped) / sum(v.numel() for v in stepped.values())
    assert unchanged >= 0.9, f"bfloat16 weights round most 1e-6 updates away (kept {unchanged:.3f})"


@pytest.mark.parametrize(
    "precision, accum_freq, method",
    [
        ("amp_bf16", 1, "clip"),
        ("bf16", 1, "clip"),
        ("bf16", 2, "clip"),
        ("amp_bf16", 2, "clip"),
        ("bf16", 1, "pgs0.5"),
        ("amp_bf16", 1, "pgs0.5"),
    ],
)  # PGS selects in float32 from bfloat16 tokens
def test_low_precision_losses_follow_fp32(precision, accum_freq, method):
    _, _, _, reference = run_steps("fp32", lr=1e-3, method=method)
    _, _, _, losses = run_steps(precision, lr=1e-3, accum_freq=accum_freq, method=method)
    for a, b in zip(losses, reference):
        assert abs(a - b) <= 0.05 * abs(b), (losses, reference)
    assert losses != reference  # the step really computed in bfloat16


def test_pgs_under_bf16_selects_what_fp32_selects(monkeypatch):
    """The images reach the model in float32 and are cast for the towers only: PGS selects
    from the unrounded pixels (bfloat16 pixels changed about 60 % of its kept patches here)."""
    import training.methods.pgs as pgs

    kept, encode = [], pgs.encode_selected_tokens
    monkeypatch.setattr(
        pgs,
        "encode_selected_tokens",
        lambda visual, tokens, selection: kept.append(selection.keep_index) or encode(visual, tokens, selection),
    )
    for precision in ("fp32", "bf16"):
        run_steps(precision, lr=1e-3, steps=1, method="pgs0.5")
    assert len(kept) == 2 and torch.equal(kept[0], kept[1])


def test_long_clip_kept_positions_stay_frozen_on_the_bf16_copy():
    """The frozen rows are a declaration the step enforces on the master gradients, not a hook
    on a tensor the bfloat16 copy (or FSDP's shards) would not carry."""
    model, _, start, _ = run_steps("bf16", lr=1e-3, method="longclip")
    table, keep = model.tower.positional_embedding.detach(), model.tower.frozen_rows["positional_embedding"]
    assert torch.equal(table[:keep], start["tower.positional_embedding"][:keep])
    assert not torch.equal(model.tower.text_projection, start["tower.text_projection"])  # it trained
