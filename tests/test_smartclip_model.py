"""SmartCLIP's mask network and its wiring: binary straight-through masks that start all
ones, pads ignored, gradients reaching the mask network and the text tower, per-group
learning rates, the mask density metric of a training step, and the masked scorer of a
checkpoint (equal to the loss's masked cosine, robust to row rescaling)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from training import checkpoint
from training.batches import IMAGES, TEXTS
from training.config import apply_overrides
from training.inference import load_inference_model
from training.methods.smartclip.scoring import masked_similarity
from training.loop import LoopSettings, train_step
from training.methods.smartclip.loss import compute_masked_cosine
from training.methods.recipes import build_method_config
from training.methods.smartclip.mask_network import MaskNetwork, binarize_straight_through, compute_padding_mask
from training.model import build_training_model
from training.objectives import build_objective
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer

ARCH = "clip-micro-p8-32"
CAPTIONS = [
    "a small red circle",
    "a blue square on the left and a green star at the top right",
    "stripes",
    "a large yellow triangle in the center",
]

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def smartclip_config(**overrides):
    return apply_overrides(build_method_config("smartclip"), {"model.arch": ARCH, **overrides})


def test_straight_through_mask_is_binary_with_sigmoid_gradient():
    logits = torch.randn(4, 8, requires_grad=True)
    probs = torch.sigmoid(logits)
    mask = binarize_straight_through(probs)
    assert set(mask.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask.detach(), (probs > 0.5).float())
    (grad,) = torch.autograd.grad(mask.sum(), logits)
    torch.testing.assert_close(grad, probs.detach() * (1 - probs.detach()))


def test_padding_mask_marks_positions_after_eot():
    tokens = build_tokenizer(ARCH)(["a red circle", "a"])
    padding = compute_padding_mask(tokens)
    lengths = (tokens != 0).sum(1)  # sot + words + eot
    for row, length in enumerate(lengths.tolist()):
        assert not padding[row, :length].any() and padding[row, length:].all()


def test_masks_start_all_ones_and_ignore_pads():
    torch.manual_seed(0)
    net = MaskNetwork(width=32, heads=2, embed_dim=16, init_bias=3.0)
    texts = build_tokenizer(ARCH)(CAPTIONS)
    states = torch.randn(len(CAPTIONS), texts.shape[1], 32)
    masks, probs = net(states, texts)
    assert torch.equal(masks, torch.ones_like(masks)) and torch.allclose(probs, torch.sigmoid(torch.tensor(3.0)))
    torch.nn.init.normal_(net.pool.attn.out_proj.weight)  # a trained pooler: masks now vary
    padding = compute_padding_mask(texts)
    changed = states.clone()
    changed[padding] = torch.randn(int(padding.sum()), 32)  # states at pads must not matter
    torch.testing.assert_close(net(changed, texts)[1], net(states, texts)[1])


def test_gradients_reach_mask_network_and_text_tower():
    torch.manual_seed(0)
    config = smartclip_config()
    model = build_training_model(config)
    torch.nn.init.normal_(model.mask_network.pool.attn.out_proj.weight, std=0.5)
    tokenizer = build_tokenizer(ARCH, model.tower.context_length)
    outputs = model(torch.randn(4, 3, 32, 32), tokenizer(CAPTIONS))
    assert set(outputs["text_masks"].detach().unique().tolist()) <= {0.0, 1.0}
    terms = build_objective(config.loss, config.smartclip, 0, 1)(outputs)
    sum(terms.values()).backward()
    for name in (
        "mask_network.block.attn.in_proj_weight",
        "mask_network.pool.query",
        "mask_network.bias",
        "tower.transformer.resblocks.0.attn.in_proj_weight",
        "tower.visual.conv1.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mask_network_gets_its_own_learning_rate():
    config = smartclip_config()
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"decay": 1e-6, "no_decay": 1e-6, "new_decay": 1e-3, "new_no_decay": 1e-3}
    new_params = {id(p) for g in optimizer.param_groups if g["name"].startswith("new_") for p in g["params"]}
    assert new_params == {id(p) for p in model.mask_network.parameters()}
    scheduler = build_scheduler(optimizer, warmup_steps=4, total_steps=10)
    optimizer.step()
    scheduler.step()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([5e-7, 5e-7, 5e-4, 5e-4])


def test_training_step_logs_mask_density_as_a_device_tensor():
    torch.manual_seed(0)
    config = smartclip_config(**{"optim.warmup_steps": 1})
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 1, 10)
    tokenizer = build_tokenizer(ARCH, model.tower.context_length)
    batch = {
        IMAGES: np.random.default_rng(0).integers(0, 255, (4, 3, 32, 32), dtype=np.uint8),
        TEXTS: tokenizer(CAPTIONS).numpy(),
    }
    settings = LoopSettings(start_step=0, total_steps=1, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    metrics = train_step(
        model, build_objective(config.loss, config.smartclip, 0, 1), optimizer, scheduler, batch, settings
    )
    assert torch.is_tensor(metrics["mask_density"]) and metrics["mask_density"].item() == 1.0
    assert {"loss/align", "loss/sparsity", "loss/total"} <= set(metrics)
    assert metrics["loss/sparsity"].item() == pytest.approx(0.01 * model.tower.text_projection.shape[1])


def save_smartclip_checkpoint(directory: Path):
    torch.manual_seed(0)
    config = smartclip_config(**{"model.text_positions_kept": 8})
    model = build_training_model(config)
    torch.nn.init.normal_(model.mask_network.pool.attn.out_proj.weight, std=0.5)
    optimizer = build_optimizer(model, config.optim)
    checkpoint.save_checkpoint(directory, model, optimizer, build_scheduler(optimizer, 1, 2), 1, config, {})
    return model


def test_masked_scorer_of_a_checkpoint_equals_the_loss_cosine(tmp_path):
    model = save_smartclip_checkpoint(tmp_path / "ckpt").eval()
    plain = load_inference_model(str(tmp_path / "ckpt"))
    masked = load_inference_model(str(tmp_path / "ckpt"), scorer="masked")
    assert plain.info["scorer"] == "plain" and masked.info["scorer"] == "masked"
    context = 8 + 4 * (77 - 8)
    tokens = masked.tokenizer(CAPTIONS)
    assert tokens.shape == (4, context) and plain.tokenizer(CAPTIONS).shape == (4, context)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        packed_image, packed_text = masked.model.encode_image(images), masked.model.encode_text(tokens)
        scores = masked_similarity(packed_image, packed_text)
        outputs = model(images, tokens)
        expected = compute_masked_cosine(outputs["image_features"], outputs["text_features"], outputs["text_masks"])
        plain_scores = plain.similarity(plain.model.encode_image(images), plain.model.encode_text(tokens))
    assert outputs["text_masks"].min() == 0  # the masks really select dimensions here
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain_scores, outputs["image_features"] @ outputs["text_features"].T)
    rescaled = masked_similarity(packed_image * torch.rand(3, 1) * 5, packed_text * torch.rand(4, 1) * 5)
    torch.testing.assert_close(rescaled, scores, rtol=1e-5, atol=1e-6)  # L2-normalising rows is harmless


def test_masked_scorer_needs_a_mask_network(tmp_path):
    config = apply_overrides(build_method_config("clip"), {"model.arch": ARCH})
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    checkpoint.save_checkpoint(tmp_path, model, optimizer, build_scheduler(optimizer, 1, 2), 1, config, {})
    with pytest.raises(ValueError, match="mask network"):
        load_inference_model(str(tmp_path), scorer="masked")
