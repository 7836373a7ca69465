"""Symmetric InfoNCE (CLIP, Radford et al. 2021, Eq. in Fig. 3) over features gathered across
workers with gradients; the logits are the topology's (training/methods/topology/spaces.py). On the sphere
it equals open_clip's `ClipLoss` on the same inputs."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from training.collectives import all_gather_with_grad
from training.methods.topology.spaces import Sphere


def gather_features(
    features: torch.Tensor, rank: int, world_size: int, with_grad: bool, local_loss: bool = False
) -> torch.Tensor:
    """Concatenate every worker's features (B_global, D) in rank order."""
    if world_size == 1:
        return features
    if with_grad:  # backward: reduce-scatter of the sum, as torch.distributed.nn's all_gather
        return all_gather_with_grad(features)
    gathered = [torch.zeros_like(features) for _ in range(world_size)]
    dist.all_gather(gathered, features)
    if not local_loss:  # the local rows then score through the gathered copy: keep its grad
        gathered[rank] = features
    return torch.cat(gathered, dim=0)


def compute_contrastive_logits(
    image_features, text_features, logit_scale, rank, world_size, gather_with_grad, local_loss, topology: Sphere
):
    """(logits_per_image, logits_per_text, labels) in open_clip's ClipLoss conventions; every
    topology's similarity is symmetric, so the text rows are the transpose where both exist."""
    all_image = gather_features(image_features, rank, world_size, gather_with_grad, local_loss)
    all_text = gather_features(text_features, rank, world_size, gather_with_grad, local_loss)
    if local_loss:  # each worker scores its own rows against the whole batch
        logits_per_image = topology.logits(image_features, all_text, logit_scale)  # (B, B_global)
        logits_per_text = topology.logits(text_features, all_image, logit_scale)
        offset = rank * image_features.shape[0]
    else:
        logits_per_image = topology.logits(all_image, all_text, logit_scale)  # (B_global, B_global)
        logits_per_text = logits_per_image.T
        offset = 0
    labels = torch.arange(logits_per_image.shape[0], device=image_features.device) + offset
    return logits_per_image, logits_per_text, labels


class ContrastiveLoss(nn.Module):
    """{"contrastive": symmetric cross-entropy} from the topology's image and text embeddings
    (the sphere's unit features when no topology is given)."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        topology: Sphere | None = None,
    ):
        super().__init__()
        self.topology = topology or Sphere(1)
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(self, outputs: dict) -> dict:
        logits_i, logits_t, labels = compute_contrastive_logits(
            outputs["image_features"],
            outputs["text_features"],
            outputs["logit_scale"],
            self.rank,
            self.world_size,
            self.gather_with_grad,
            self.local_loss,
            self.topology,
        )
        loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        return {"contrastive": loss}
