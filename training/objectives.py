"""The training objective a config names (`loss.kind`): each takes the model's output dict
and returns a dict of named loss terms that the loop sums."""
from __future__ import annotations

from torch import nn

from training.config import LossConfig, SmartClipConfig
from training.losses.contrastive import ContrastiveLoss
from training.losses.longclip import LongClipLoss
from training.losses.modular import ModularContrastiveLoss
from training.topology import Sphere

OBJECTIVE_KINDS = ("clip", "longclip", "smartclip")


def build_objective(loss: LossConfig, smartclip: SmartClipConfig, rank: int, world_size: int,
                    topology: Sphere | None = None) -> nn.Module:
    """The objective on the model's topology (the sphere by default); SmartCLIP's masks are
    defined on the sphere only (refused at config time, training/methods)."""
    gather = {"rank": rank, "world_size": world_size, "gather_with_grad": loss.gather_with_grad,
              "local_loss": loss.local_loss}
    if loss.kind == "clip":
        if loss.label_smoothing:
            raise ValueError("loss.label_smoothing is only implemented for longclip and smartclip")
        return ContrastiveLoss(**gather, topology=topology)
    if loss.kind == "longclip":
        return LongClipLoss(loss.pca_components, label_smoothing=loss.label_smoothing, **gather, topology=topology)
    if loss.kind == "smartclip":
        if topology is not None and topology.kind != "sphere":
            raise ValueError(f"loss.kind=smartclip is defined on the sphere only, not topology.kind={topology.kind}")
        return ModularContrastiveLoss(smartclip.lambda_align, smartclip.lambda_sparsity,
                                      label_smoothing=loss.label_smoothing, **gather)
    raise ValueError(f"unknown loss kind {loss.kind!r}; known: {', '.join(OBJECTIVE_KINDS)}")
