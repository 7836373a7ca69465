"""Linear probe on frozen image features, the protocol of the PGS paper's appendix and of
CLIP_benchmark's `linear_probe` without a validation sweep: a linear layer trained with AdamW
(lr 0.1, no weight decay, cosine schedule per step, no warm-up), batch 64, 10 epochs."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from evaluation.tasks.zeroshot import compute_zeroshot_metrics


@dataclass(frozen=True)
class LinearProbeConfig:
    epochs: int = 10
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total_steps)) * base_lr


def train_linear_probe(features: np.ndarray, labels: np.ndarray, n_classes: int,
                       config: LinearProbeConfig) -> torch.nn.Linear:
    """A (D -> C) linear classifier fitted by cross-entropy; seeded like CLIP_benchmark
    (torch.manual_seed before the layer is built; shuffling draws from the same generator)."""
    torch.manual_seed(config.seed)
    model = torch.nn.Linear(features.shape[1], n_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    data = TensorDataset(torch.from_numpy(np.asarray(features, np.float32)), torch.from_numpy(labels))
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True)
    total_steps = config.epochs * len(loader)
    for epoch in range(config.epochs):
        for i, (x, y) in enumerate(loader):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(config.lr, i + epoch * len(loader), total_steps)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model


def evaluate_linear_probe(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                          test_labels: np.ndarray, n_classes: int,
                          config: LinearProbeConfig = LinearProbeConfig()) -> dict[str, float]:
    """Top-1/top-5/mean per-class recall of the probe on the test features."""
    train_labels, test_labels = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    if train_labels.ndim != 1:
        raise ValueError("the linear probe needs single-label classification sets")
    model = train_linear_probe(train_features, train_labels, n_classes, config)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.asarray(test_features, np.float32))).double().numpy()
    return compute_zeroshot_metrics(logits, test_labels)
