"""Linear probe on frozen image features. Default: the protocol of the PGS paper's appendix and
of CLIP_benchmark's `linear_probe` without a validation sweep, a linear layer trained with AdamW
(lr 0.1, no weight decay, cosine schedule per step, no warm-up), batch 64, 10 epochs. The
topology paper's (MoCo v3's) optimiser is `optimizer="sgd"`: SGD without momentum or weight
decay, lr 1.0 cosine after `warmup_epochs` = 5 linear warm-up epochs, 100 epochs (its
RandomResizedCrop + RandAugment on the training images comes as V pre-encoded views per image,
evaluation/probe_views.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from scoring.zeroshot import compute_zeroshot_metrics


OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class LinearProbeConfig:
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0
    optimizer: str = "adamw"
    warmup_epochs: int = 0

    def describe(self, features: str = "embedding") -> str:
        warmup = f"-warmup{self.warmup_epochs}" if self.warmup_epochs else ""
        return f"{self.optimizer}-lr{self.lr}-bs{self.batch_size}-ep{self.epochs}{warmup}-{features}"


def cosine_lr(base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from base_lr to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def build_probe_optimizer(model: torch.nn.Module, config: LinearProbeConfig) -> torch.optim.Optimizer:
    if config.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown linear-probe optimizer {config.optimizer!r}; known: {OPTIMIZERS}")
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.0, weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def train_linear_probe(
    features: np.ndarray, labels: np.ndarray, n_classes: int, config: LinearProbeConfig
) -> torch.nn.Linear:
    """A (D -> C) linear classifier fitted by cross-entropy; seeded like CLIP_benchmark
    (torch.manual_seed before the layer is built; shuffling draws from the same generator).
    `features` (N, D), or (N, V, D) for V augmented views: epoch e trains on view e mod V."""
    features = np.asarray(features, np.float32)
    views = features if features.ndim == 3 else features[:, None]
    torch.manual_seed(config.seed)
    model = torch.nn.Linear(views.shape[2], n_classes)
    optimizer = build_probe_optimizer(model, config)
    loaders = [
        DataLoader(
            TensorDataset(torch.from_numpy(np.ascontiguousarray(views[:, v])), torch.from_numpy(labels)),
            batch_size=config.batch_size,
            shuffle=True,
        )
        for v in range(views.shape[1])
    ]
    steps_per_epoch = len(loaders[0])
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = config.warmup_epochs * steps_per_epoch
    for epoch in range(config.epochs):
        loader = loaders[epoch % len(loaders)]
        for i, (x, y) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.lr, i + epoch * steps_per_epoch, total_steps, warmup_steps)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def evaluate_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    n_classes: int,
    config: LinearProbeConfig = LinearProbeConfig(),
) -> dict[str, float]:
    """Top-1/top-5/mean per-class recall of the probe on the test features."""
    train_labels, test_labels = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    if train_labels.ndim != 1:
        raise ValueError("the linear probe needs single-label classification sets")
    model = train_linear_probe(train_features, train_labels, n_classes, config)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(test_features, np.float32))).double().numpy()
    return compute_zeroshot_metrics(logits, test_labels)
