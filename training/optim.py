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


def build_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if is_decayed(n, p)]
    no_decay = [p for n, p in named if not is_decayed(n, p)]
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(build_param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.eps)


def compute_lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from ~0 to 1, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: compute_lr_factor(step, warmup_steps, total_steps))
