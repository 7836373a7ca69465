"""Every method's training path on a GPU in bf16 autocast, on the production tower (ViT-B/16):
evaluation features agree with float32, and one optimiser step gives a finite loss and
gradient and moves the weights. Needs CUDA (CI has none; `scripts/gpu_check.sh` runs these
on a lent GPU machine) and skips itself without it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.batches import EDGE_SCORES, IMAGES, SHORT_TEXTS, TEXTS
from training.config import apply_overrides
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import METHODS, build_method_config
from training.model import build_training_model, tower_geometry
from training import checkpoint
from training.auxiliary import parts_of, update_parts
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer
from training.transforms import normalize_image_tensor

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ARCH = "ViT-B-16"
BATCH = 8


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> str:
    """A ViT-B/16 checkpoint of this project for the methods that fine-tune (CIBR)."""
    config = apply_overrides(build_method_config("clip"), {"model.arch": ARCH})
    torch.manual_seed(0)
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    directory = tmp_path_factory.mktemp("start") / "step_00000000"
    return str(checkpoint.save_checkpoint(directory, model, optimizer, build_scheduler(optimizer, 1, 2), 0, config, {}))


def gpu_model(method: str, start: str):
    config = build_method_config(method)
    overrides = {"model.arch": ARCH, **({"model.pretrained": start} if config.loss.regularizer != "none" else {})}
    config = apply_overrides(config, overrides)
    torch.manual_seed(0)
    return config, build_training_model(config).cuda()


def gpu_batch(config, model) -> dict:
    rng = np.random.default_rng(0)
    image_size, patch = tower_geometry(model)
    tokenizer = build_tokenizer(ARCH, model.tower.context_length)
    captions = [
        f"a {c} square and a {d} circle, photo {i}"
        for i, (c, d) in enumerate(rng.choice(["red", "blue", "green"], (BATCH, 2)))
    ]
    batch = {
        IMAGES: rng.integers(0, 256, (BATCH, 3, image_size, image_size), dtype=np.uint8),
        TEXTS: tokenizer(captions).numpy(),
    }
    if config.data.caption_policy == "long_and_short":
        batch[SHORT_TEXTS] = tokenizer([c.split(",")[0] for c in captions]).numpy()
    if config.masking.kind == "pgs":
        batch[EDGE_SCORES] = rng.random((BATCH, (image_size // patch) ** 2), dtype=np.float32) * 100
    return batch


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_features_agree_with_float32(method, start_checkpoint):
    config, model = gpu_model(method, start_checkpoint)
    batch = gpu_batch(config, model)
    images = normalize_image_tensor(torch.as_tensor(batch[IMAGES]).cuda())
    texts = torch.as_tensor(batch[TEXTS]).cuda()
    model.eval()
    with torch.no_grad():
        full = model(images, texts)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            half = model(images, texts)
    for key in ("image_features", "text_features"):
        cosine = torch.nn.functional.cosine_similarity(half[key].float(), full[key].float(), dim=-1)
        assert cosine.min().item() > 0.99, (key, cosine)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_training_step_is_finite_and_moves_the_weights(method, start_checkpoint):
    config, model = gpu_model(method, start_checkpoint)
    batch = gpu_batch(config, model)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 1, 10)
    settings = LoopSettings(0, 10, 0, 0, 1, torch.device("cuda"), bf16=True, epoch_steps=(5, 5))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    objective = build_training_objective(config, 0, 1, model, torch.device("cuda"))
    model.train()
    for step in range(2):  # the first step of the schedule has lr 0 under warm-up
        seed_step(model, 0, step, 0)
        metrics = train_step(model, objective, optimizer, scheduler, batch, settings, 0.5, step=step)
    assert torch.isfinite(metrics["loss/total"]).item() and torch.isfinite(metrics["grad_norm"]).item()
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert "tower.visual.conv1.weight" in moved and "tower.token_embedding.weight" in moved
    if config.masking.kind == "pgs":
        assert config.pgs.min_mask_ratio <= metrics["masking/drop_fraction"].item() <= config.pgs.max_mask_ratio


def test_cibr_parts_add_no_host_synchronisation(start_checkpoint):
    """CIBR's own work in a step (reference forward, gathers, noise and derangement on the
    device, the estimators' update and the encoder-side estimates and backward), after a first
    step has made the one-time starts, never waits on the GPU."""
    config, model = gpu_model("cibr", start_checkpoint)
    batch = gpu_batch(config, model)
    objective = build_training_objective(config, 0, 1, model, torch.device("cuda"))
    images = normalize_image_tensor(torch.as_tensor(batch[IMAGES]).cuda())
    texts = torch.as_tensor(batch[TEXTS]).cuda()
    for step in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = model(images, texts)
        outputs.update(inputs={"images": images, "texts": texts}, step=step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                update_parts(parts_of(objective), outputs)
                terms = objective(outputs)
            sum(terms.values()).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)
