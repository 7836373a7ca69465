"""CIBR's objective and the auxiliary-part mechanism, in process: which step changes what, the
frozen reference towers (unmasked, never trained, never exported), λ's schedule, two gloo
processes equal one process on the whole batch, and a checkpoint restores every auxiliary
tensor bit for bit. Through Ray Train (two workers, resume): test_cibr_train.py."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tests.eval_fixtures import ARCH, save_micro_checkpoint
from training import checkpoint
from training.auxiliary import parts_of, state_digest, update_parts
from training.batches import EDGE_SCORES, IMAGES, TEXTS
from training.config import apply_overrides
from training.methods.cibr.objective import cibr_weight
from training.loop import LoopSettings, train_step
from training.methods.flip import RandomPatchDrop
from training.methods.recipes import build_method_config, check_combination
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer

CAPTIONS = ["a red thing", "a green thing", "a blue square", "two yellow dots", "a cyan line", "one magenta blob"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    return str(save_micro_checkpoint(tmp_path_factory.mktemp("start") / "step_00000001"))


def cibr_config(pretrained: str, **overrides):
    return apply_overrides(
        build_method_config("cibr"),
        {
            "model.arch": ARCH,
            "model.pretrained": pretrained,
            "cibr.hidden": 32,
            "cibr.ramp_steps": 0,
            "optim.lr": 1e-3,
            "optim.warmup_steps": 1,
            **overrides,
        },
    )


def setup(config, rank: int = 0, world: int = 1):
    torch.manual_seed(config.run.seed)
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 1, 10)
    objective = build_training_objective(config, rank, world, model, CPU)
    return model, optimizer, scheduler, objective


def make_batch(model, n: int = 6, seed: int = 0) -> dict:
    tokenizer = build_tokenizer(ARCH, model.tower.context_length)
    return {
        IMAGES: np.random.default_rng(seed).integers(0, 255, (n, 3, 32, 32), dtype=np.uint8),
        TEXTS: tokenizer((CAPTIONS * 4)[:n]).numpy(),
    }


def settings(step: int = 0, world: int = 1, rank: int = 0) -> LoopSettings:
    return LoopSettings(start_step=step, total_steps=step + 1, seed=0, rank=rank, world_size=world, device=CPU)


def snapshot(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_method_cibr_fine_tunes_and_refuses_a_start_from_scratch(pretrained):
    config = cibr_config(pretrained, **{"cibr.lambda": 0.25})
    assert config.cibr.lambda_ == 0.25 and config.loss.regularizer == "cibr"
    assert not config.loss.learn_temperature and config.loss.init_logit_scale == pytest.approx(math.log(100), abs=1e-4)
    with pytest.raises(ValueError, match="cibr.*model.pretrained"):
        check_combination(apply_overrides(config, {"model.pretrained": None}))
    with pytest.raises(ValueError, match="unknown cibr.estimator 'nope'"):
        setup(apply_overrides(config, {"cibr.estimator": "nope"}))


def test_an_estimator_step_and_an_encoder_step_change_only_their_own_parameters(pretrained):
    model, optimizer, scheduler, objective = setup(
        cibr_config(pretrained, **{"masking.kind": "random", "masking.ratio": 0.5})
    )
    reference, estimators = (part.module for part in parts_of(objective))
    model_before, ref_before, est_before = snapshot(model), snapshot(reference), snapshot(estimators)
    # The estimators' own update alone: only their weights, buffers (EMA, affine starts) move.
    images, texts = torch.randn(6, 3, 32, 32), torch.as_tensor(make_batch(model)[TEXTS])
    outputs = model(images, texts)
    outputs.update(inputs={"images": images, "texts": texts}, step=0)
    update_parts(parts_of(objective), outputs)
    assert changed(model_before, model) == set() and changed(ref_before, reference) == set()
    assert all(p.grad is None for p in model.parameters())  # the estimators' loss reached no encoder
    assert changed(est_before, estimators) == set(est_before)  # every tensor of every estimator
    # The encoders' step (backward of L_CLIP + λR and the AdamW step) leaves them alone.
    est_before = snapshot(estimators)
    terms = objective(outputs)
    optimizer.zero_grad()
    sum(terms.values()).backward()
    assert all(p.grad is None for p in estimators.parameters()) and all(p.grad is None for p in reference.parameters())
    optimizer.step()
    assert changed(est_before, estimators) == set() and changed(ref_before, reference) == set()
    assert changed(model_before, model)
    # The whole loop step: the frozen towers still never change, nor are they in the model.
    train_step(model, objective, optimizer, scheduler, make_batch(model), settings(), step=0)
    assert changed(ref_before, reference) == set()
    assert not any(k.startswith(("reference", "estimators")) for k in model.state_dict())


def test_the_frozen_towers_see_the_whole_unmasked_image_and_pre_projection_features(pretrained):
    model, _, _, objective = setup(cibr_config(pretrained, **{"masking.kind": "random", "masking.ratio": 0.5}))
    reference = parts_of(objective)[0].module
    start = checkpoint.tower_state_dict(checkpoint.fetch_checkpoint(pretrained))
    images, texts = torch.randn(4, 3, 32, 32), torch.as_tensor(make_batch(model, 4)[TEXTS])
    x_v, x_t = reference(images, texts)
    assert isinstance(model.tower.visual.patch_dropout, RandomPatchDrop)  # the trained tower drops patches
    assert not isinstance(reference.tower.visual.patch_dropout, RandomPatchDrop)  # its frozen copy does not
    with torch.no_grad():  # by hand from the starting weights: class token after ln_post, before proj
        plain = build_training_model(
            apply_overrides(cibr_config(None), {"loss.regularizer": "none", "model.pretrained": None})
        )
        plain.tower.load_state_dict(start)
        tokens = plain.tower.visual.transformer(plain.tower.visual._embeds(images))
        want_v = plain.tower.visual.ln_post(tokens[:, 0])
    torch.testing.assert_close(x_v, want_v, rtol=1e-5, atol=1e-5)  # dropping half the patches moves it by ~1e-1
    assert x_t.shape == (4, plain.tower.transformer.width)
    reference.train()  # the loop's model.train() must not switch the frozen copy to training
    assert not reference.training and not any(p.requires_grad for p in reference.parameters())


def test_cibr_combines_with_pgs_selection(pretrained):
    """PGS selects patches of the trained vision tower (its masking statistics are logged); the
    reference towers, plain open_clip towers outside the model, are never touched by it."""
    config = cibr_config(pretrained, **{"masking.kind": "pgs", "pgs.min_mask_ratio": 0.5, "pgs.max_mask_ratio": 0.5})
    model, optimizer, scheduler, objective = setup(config)
    reference = parts_of(objective)[0].module
    before, lengths = snapshot(reference), []
    reference.tower.visual.transformer.register_forward_hook(lambda m, args, out: lengths.append(args[0].shape[1]))
    batch = {**make_batch(model, 4), EDGE_SCORES: np.random.default_rng(1).random((4, 16), dtype=np.float32) * 50}
    metrics = train_step(model, objective, optimizer, scheduler, batch, settings(), step=0)
    assert any(k.startswith("masking/") for k in metrics) and torch.isfinite(metrics["cibr/R"])
    assert float(metrics["masking/kept_patches"]) < 16  # the trained tower saw a selection ...
    grid = reference.tower.visual.grid_size
    assert lengths == [1 + grid[0] * grid[1]]  # ... its frozen copy every patch of the image
    assert changed(before, reference) == set()


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16", "bf16"])
def test_the_frozen_towers_compute_in_the_steps_precision(pretrained, precision):
    """No grad, and bfloat16 arithmetic under either bfloat16 precision (under `bf16` the
    model's outputs reach the parts upcast, so the loop's autocast is what sets it; train.py's
    loop_settings turns it on for DDP's master weights and FSDP alike)."""
    from training.precision import MasterWeights

    model, optimizer, scheduler, objective = setup(cibr_config(pretrained))
    reference = parts_of(objective)[0].module
    seen = set()  # (requires grad, dtype) of every linear layer's output in both frozen towers
    for layer in (m for m in reference.modules() if isinstance(m, torch.nn.Linear)):
        layer.register_forward_hook(lambda module, args, out: seen.add((out.requires_grad, out.dtype)))
    weights = MasterWeights(model) if precision == "bf16" else None
    step_settings = dataclasses.replace(settings(), bf16=precision == "amp_bf16", parts_bf16=precision == "bf16")
    metrics = train_step(
        weights.compute if weights else model,
        objective,
        optimizer,
        scheduler,
        make_batch(model),
        step_settings,
        step=0,
        weights=weights,
    )
    want = torch.float32 if precision == "fp32" else torch.bfloat16
    assert seen == {(False, want)} and torch.isfinite(metrics["loss/total"])


def test_lambda_is_zero_during_the_warm_up_then_ramps_linearly():
    config = build_method_config("cibr")
    cfg = apply_overrides(config, {"cibr.warmup_steps": 3, "cibr.ramp_steps": 4, "cibr.lambda": 0.5}).cibr
    assert [cibr_weight(s, cfg) for s in range(9)] == [0, 0, 0, 0.125, 0.25, 0.375, 0.5, 0.5, 0.5]


def test_the_step_logs_the_four_estimates_r_lambda_and_infonce(pretrained):
    model, optimizer, scheduler, objective = setup(cibr_config(pretrained))
    with pytest.raises(ValueError, match="needs the step number"):
        train_step(model, objective, optimizer, scheduler, make_batch(model), settings())
    metrics = train_step(model, objective, optimizer, scheduler, make_batch(model), settings(), step=0)
    for key in ("cibr/A_v", "cibr/C_v", "cibr/A_t", "cibr/C_t", "cibr/R", "cibr/infonce"):
        assert torch.is_tensor(metrics[key]) and torch.isfinite(metrics[key])
    r = (metrics["cibr/A_v"] - metrics["cibr/C_v"]) + (metrics["cibr/A_t"] - metrics["cibr/C_t"])
    assert metrics["cibr/R"] == r and metrics["cibr/lambda"] == 0.5
    assert metrics["loss/cibr"] == pytest.approx(0.5 * r.item())
    assert metrics["cibr/infonce"] == pytest.approx(math.log(6) - metrics["loss/contrastive"].item())


@pytest.mark.parametrize("estimator", ["mine", "mine_f", "club"])
def test_a_checkpoint_restores_every_auxiliary_tensor_bit_for_bit(pretrained, tmp_path, estimator):
    config = cibr_config(pretrained, **{"cibr.estimator": estimator})
    model, optimizer, scheduler, objective = setup(config)
    for step in range(3):
        train_step(model, objective, optimizer, scheduler, make_batch(model, seed=step), settings(step), step=step)
    run_dir = str(tmp_path / "run")
    directory = checkpoint.save_checkpoint(
        tmp_path / "run" / "step_00000003", model, optimizer, scheduler, 3, config, {}, parts_of(objective), run_dir
    )
    assert (tmp_path / "run" / "reference.safetensors").exists()
    assert not (directory / "auxiliary.reference.safetensors").exists()  # stored once, not per checkpoint
    # A resume builds the architecture only (no --pretrained fetch) and reads everything back.
    torch.manual_seed(123)
    fresh_model = build_training_model(config, with_weights=False)
    fresh_optimizer = build_optimizer(fresh_model, config.optim)
    fresh_scheduler = build_scheduler(fresh_optimizer, 1, 10)
    fresh = build_training_objective(config, 0, 1, fresh_model, CPU, fresh=False)
    checkpoint.load_training_state(directory, fresh_model, fresh_optimizer, fresh_scheduler, parts_of(fresh), run_dir)
    for saved, loaded in zip(parts_of(objective), parts_of(fresh)):
        assert saved.module.state_dict().keys() == loaded.module.state_dict().keys()
        assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in saved.module.state_dict().items())
    assert state_digest(parts_of(fresh)) == state_digest(parts_of(objective))  # estimator Adam moments too
    estimators = parts_of(fresh)[1].module
    if estimator == "mine":
        assert estimators["image"].joint.started and estimators["image"].joint.log_mu != 0
    # ... so the next step is the uninterrupted one's, bit for bit.
    batch = make_batch(model, seed=9)
    a = train_step(model, objective, optimizer, scheduler, batch, settings(3), step=3)
    b = train_step(fresh_model, fresh, fresh_optimizer, fresh_scheduler, batch, settings(3), step=3)
    assert all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a if k.startswith(("loss", "cibr")))
    assert state_digest(parts_of(fresh)) == state_digest(parts_of(objective))


def test_a_leftover_reference_copy_of_an_earlier_run_is_replaced(pretrained, tmp_path):
    """A run of the same name that died before its first checkpoint left its own copy."""
    config = cibr_config(pretrained)
    model, optimizer, scheduler, objective = setup(config)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "reference.safetensors").write_bytes(b"an earlier run's towers")
    directory = checkpoint.save_checkpoint(
        tmp_path / "run" / "step_00000001",
        model,
        optimizer,
        scheduler,
        1,
        config,
        {},
        parts_of(objective),
        str(tmp_path / "run"),
    )
    recorded = checkpoint.read_state(directory)["auxiliary"]["reference"]["sha256"]
    assert checkpoint.storage.file_sha256(str(tmp_path / "run" / "reference.safetensors")) == recorded


def test_a_tampered_reference_copy_is_refused(pretrained, tmp_path):
    config = cibr_config(pretrained)
    model, optimizer, scheduler, objective = setup(config)
    run_dir = str(tmp_path / "run")
    directory = checkpoint.save_checkpoint(
        tmp_path / "run" / "step_00000001", model, optimizer, scheduler, 1, config, {}, parts_of(objective), run_dir
    )
    (tmp_path / "run" / "reference.safetensors").write_bytes(b"not the towers")
    fresh = build_training_objective(config, 0, 1, model, CPU, fresh=False)
    with pytest.raises(ValueError, match="does not match the digest"):
        checkpoint.load_training_state(directory, model, optimizer, scheduler, parts_of(fresh), run_dir)


# ---------------------------------------------------------------- two gloo processes
WORLD, ROWS = 2, 4


def global_batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(WORLD * ROWS, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return images, torch.as_tensor(make_batch(model, WORLD * ROWS)[TEXTS])


def cibr_step(config, rows: slice, rank: int, world: int) -> dict:
    """One CIBR step (estimators' update, then L + λR backward) on `rows` of the global batch;
    the model's gradients averaged over ranks as DDP averages them."""
    import torch.distributed as dist

    model, _, _, objective = setup(config, rank, world)
    images, texts = global_batch(model)
    outputs = model(images[rows], texts[rows])
    outputs.update(inputs={"images": images[rows], "texts": texts[rows]}, step=0)
    update_parts(parts_of(objective), outputs)
    sum(objective(outputs).values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return {
        "digest": state_digest(parts_of(objective)),
        "R": outputs["diagnostics"]["cibr/R"],
        "grads": grads,
        "estimators": {k: v.clone() for k, v in parts_of(objective)[1].module.state_dict().items()},
    }


def run_cibr_rank(rank: int, port: int, pretrained: str, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = cibr_step(cibr_config(pretrained), slice(rank * ROWS, (rank + 1) * ROWS), rank, WORLD)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_take_the_same_estimator_step_as_one_process_on_the_whole_batch(
    pretrained, tmp_path, single_torch_thread
):
    """The estimators see the gathered batch with (seed, step) noise and derangement: both
    ranks end bit-identical, and equal to one process on all rows, as are R and the
    encoders' (DDP-averaged) gradients of L + λR."""
    import torch.multiprocessing as mp

    from tests.conftest import free_port

    mp.spawn(run_cibr_rank, args=(free_port(), pretrained, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    whole = cibr_step(cibr_config(pretrained), slice(None), 0, 1)
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert all(torch.equal(v, ranks[1]["estimators"][k]) for k, v in ranks[0]["estimators"].items())
    for k, v in whole["estimators"].items():
        torch.testing.assert_close(ranks[0]["estimators"][k].float(), v.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["R"], whole["R"], rtol=1e-4, atol=1e-5)
    assert ranks[0]["grads"].keys() == whole["grads"].keys()
    for name, g in whole["grads"].items():
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-3, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
