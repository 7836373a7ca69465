"""The training objective a config names (`loss.kind`, plus `loss.regularizer`): each takes
the model's output dict (with the step's `inputs` and `step`) and returns a dict of named loss
terms that the loop sums. An objective may own auxiliary parts (training/auxiliary.py)."""

from __future__ import annotations

from torch import nn

import torch

from training.config import LossConfig, SmartClipConfig, TrainConfig
from training.methods.longclip.positions import apply_long_text
from training.methods.cibr.objective import CibrObjective, ReferenceTowers
from training.methods.clip.loss import ContrastiveLoss
from training.methods.longclip.loss import LongClipLoss
from training.methods.smartclip.loss import ModularContrastiveLoss
from training.pretrained import load_pretrained_tower
from training.methods.topology.spaces import Sphere

OBJECTIVE_KINDS = ("clip", "longclip", "smartclip")
REGULARIZERS = ("none", "cibr")


def build_objective(
    loss: LossConfig, smartclip: SmartClipConfig, rank: int, world_size: int, topology: Sphere | None = None
) -> nn.Module:
    """The objective on the model's topology (the sphere by default); SmartCLIP's masks are
    defined on the sphere only (refused at config time, training/methods)."""
    gather = {
        "rank": rank,
        "world_size": world_size,
        "gather_with_grad": loss.gather_with_grad,
        "local_loss": loss.local_loss,
    }
    if loss.kind == "clip":
        if loss.label_smoothing:
            raise ValueError("loss.label_smoothing is only implemented for longclip and smartclip")
        return ContrastiveLoss(**gather, topology=topology)
    if loss.kind == "longclip":
        return LongClipLoss(loss.pca_components, label_smoothing=loss.label_smoothing, **gather, topology=topology)
    if loss.kind == "smartclip":
        if topology is not None and topology.kind != "sphere":
            raise ValueError(f"loss.kind=smartclip is defined on the sphere only, not topology.kind={topology.kind}")
        return ModularContrastiveLoss(
            smartclip.lambda_align, smartclip.lambda_sparsity, label_smoothing=loss.label_smoothing, **gather
        )
    raise ValueError(f"unknown loss kind {loss.kind!r}; known: {', '.join(OBJECTIVE_KINDS)}")


def starting_towers(config: TrainConfig, fresh: bool) -> nn.Module:
    """The towers the run starts from (`model.pretrained`, long-text positions applied); on a
    resume only their architecture, the weights coming back from the run directory."""
    tower = load_pretrained_tower(config.model.arch, config.model.pretrained if fresh else None)
    apply_long_text(tower, config.model.text_positions_kept, config.model.text_stretch_factor)
    return tower


def build_training_objective(
    config: TrainConfig, rank: int, world_size: int, model, device: torch.device, fresh: bool = True
) -> nn.Module:
    """`build_objective` plus the configured regulariser, on the device with its parts."""
    objective = build_objective(config.loss, config.smartclip, rank, world_size, model.topology)
    if config.loss.regularizer == "none":
        return objective
    if config.loss.regularizer == "cibr":
        reference = ReferenceTowers(starting_towers(config, fresh))
        return CibrObjective(
            objective, reference, model.topology.dim, config.cibr, rank, world_size, config.run.seed
        ).attach(device)
    raise ValueError(f"unknown loss.regularizer {config.loss.regularizer!r}; known: {', '.join(REGULARIZERS)}")
