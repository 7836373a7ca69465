"""AdamW with parameter groups (no weight decay on gains, biases, embeddings and the
temperature) and a linear-warmup cosine-decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig

NO_DECAY_NAME_PARTS = ("bias", "logit_scale", "embedding", "class_embedding", "ln_", "norm")


def is_decayed(name: str, param: torch.Tensor) -> bool:
    """Matrices of linear and conv layers decay; gains, biases, embeddings and the
    temperature do not (CLIP / open_clip convention, embeddings added per our recipe)."""
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)


def is_tower(name: str) -> bool:
    """Parameters of the open_clip towers (ContrastiveModel.tower, possibly DDP-wrapped)."""
    return name.removeprefix("module.").startswith("tower.")


def split_by_decay(named: list, weight_decay: float, prefix: str = "") -> list[dict]:
    return [
        {"params": [p for n, p in named if is_decayed(n, p)], "weight_decay": weight_decay, "name": prefix + "decay"},
        {"params": [p for n, p in named if not is_decayed(n, p)], "weight_decay": 0.0, "name": prefix + "no_decay"},
    ]


def build_param_groups(model: nn.Module, weight_decay: float, new_module_lr: float | None = None) -> list[dict]:
    """decay / no_decay groups at the optimizer's lr. With `new_module_lr`, parameters outside
    the CLIP towers (SmartCLIP's mask network) get two groups of their own at that rate (the
    paper: 1e-6 for CLIP, 1e-3 for the mask network); empty groups are then left out."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if new_module_lr is None:
        return split_by_decay(named, weight_decay)
    towers = split_by_decay([(n, p) for n, p in named if is_tower(n)], weight_decay)
    new = split_by_decay([(n, p) for n, p in named if not is_tower(n)], weight_decay, "new_")
    return [g for g in towers + [{**g, "lr": new_module_lr} for g in new] if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        build_param_groups(model, cfg.weight_decay, cfg.new_module_lr), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps
    )


def compute_lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from ~0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: compute_lr_factor(step, warmup_steps, total_steps))
