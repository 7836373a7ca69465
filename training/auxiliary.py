"""Auxiliary parts: state an objective owns beside the trained model (CIBR's frozen reference
towers and its estimator networks with their own optimiser), handled by the loop and the
checkpoint for any objective that has some.

A part is a module on the device, never part of the model that evaluation and the open_clip
export see, never in the encoders' optimiser. It is either
* trainable: its own optimiser and an `update(outputs)` rule that the loop runs once per step
  after the model's forward and before the encoders' backward, on detached inputs; its
  weights, buffers and optimiser tensors go into every checkpoint; or
* frozen (no optimiser, no update): its weights are written once into the run directory and
  every checkpoint records their digest, so a resume reads them back instead of rebuilding
  them (for CIBR: instead of fetching `--pretrained` again).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class AuxiliaryPart:
    name: str  # file names in checkpoints and the run directory
    module: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    update: Callable[[dict], dict] | None = None  # step's outputs -> metrics (detached tensors)
    sha256: str | None = None  # a frozen part's digest once stored or verified (checkpoint.py)

    @property
    def frozen(self) -> bool:
        return self.optimizer is None


def parts_of(objective: nn.Module) -> list[AuxiliaryPart]:
    """The objective's auxiliary parts (none for a stateless objective)."""
    parts = getattr(objective, "auxiliary_parts", None)
    return list(parts()) if parts is not None else []


def update_parts(parts: list[AuxiliaryPart], outputs: dict) -> dict:
    """Run every trainable part's own step; their metrics, merged."""
    metrics = {}
    for part in parts:
        if part.update is not None:
            metrics.update(part.update(outputs))
    return metrics


@contextlib.contextmanager
def without_grad(module: nn.Module):
    """The module's parameters take no gradient inside the block (the encoders' step through
    an estimator), and get back their flags after it."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, and no parameter takes a gradient (a frozen part keeps eval mode for good
    by overriding `train`, as ReferenceTowers does)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _hash_tensors(h, named) -> None:
    for name, value in named:
        if torch.is_tensor(value):
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def state_digest(parts: list[AuxiliaryPart]) -> str | None:
    """sha256 of every trainable part's weights, buffers and optimizer tensors (None without
    one): equal on every rank while the parts stay synchronised."""
    trainable = [p for p in parts if not p.frozen]
    if not trainable:
        return None
    h = hashlib.sha256()
    for part in trainable:
        _hash_tensors(h, sorted(part.module.state_dict().items()))
        for index, entries in sorted(part.optimizer.state_dict()["state"].items()):
            _hash_tensors(h, ((f"{part.name}.{index}.{k}", v) for k, v in sorted(entries.items())))
    return h.hexdigest()


def check_ranks_agree(parts: list[AuxiliaryPart], step: int) -> list[str]:
    """Every rank's `state_digest` (rank order; one collective, at checkpoints only). Ranks
    whose parts differ raise: a checkpoint of rank 0's state would hide that the others
    trained different estimators."""
    digest = state_digest(parts)
    if digest is None:
        return []
    digests = [digest]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise RuntimeError(f"step {step}: the auxiliary parts differ across ranks (state digests {digests})")
    return digests
