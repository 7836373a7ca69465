"""Long-CLIP's fine-tuning loss (Zhang et al., ECCV 2024; docs/methods/longclip.md §2): the CLIP loss
on long captions with full image features, plus the CLIP loss on short captions against
each image's projection onto the batch's top-k principal components ("coarse-grained"
image features). Logits and the re-embedding of the projected features are the topology's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.clip.loss import compute_contrastive_logits
from training.methods.topology.spaces import Sphere


def project_to_principal_components(features: torch.Tensor, num_components: int) -> torch.Tensor:
    """(B, d) -> (B, d): centre the batch, keep its top-k principal directions, map back and
    add the mean again. The directions come from an SVD treated as constant (no gradient
    through the decomposition, whose derivative blows up at repeated singular values); the
    gradient flows through the projection itself. On CUDA the SVD synchronises with the host
    once per step (as the eigendecomposition in Long-CLIP's own code does)."""
    mean = features.mean(dim=0, keepdim=True)  # (1, d)
    centred = features - mean
    with torch.no_grad():
        low_precision = centred.dtype in (torch.float16, torch.bfloat16)  # SVD needs fp32 there
        _, _, vh = torch.linalg.svd(centred.float() if low_precision else centred, full_matrices=False)
    basis = vh[:num_components].to(features.dtype)  # (k, d)
    return centred @ basis.T @ basis + mean


class LongClipLoss(nn.Module):
    """{"long": CLIP loss (image, long caption), "short": CLIP loss (PCA image, short
    caption)}; both symmetric, averaged over the two directions like `ContrastiveLoss`. The
    PCA is over this worker's batch; its projected features are mapped back onto the
    topology's manifold (`embed`: re-normalised on the sphere) and gathered across workers
    with gradients."""

    def __init__(
        self,
        num_components: int,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        label_smoothing: float = 0.0,
        topology: Sphere | None = None,
    ):
        super().__init__()
        self.topology = topology or Sphere(1)
        self.num_components = num_components
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.label_smoothing = label_smoothing

    def clip_loss(self, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        logits_i, logits_t, labels = compute_contrastive_logits(
            image, text, scale, self.rank, self.world_size, self.gather_with_grad, self.local_loss, self.topology
        )
        smoothing = self.label_smoothing
        return (
            F.cross_entropy(logits_i, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits_t, labels, label_smoothing=smoothing)
        ) / 2

    def forward(self, outputs: dict) -> dict:
        image = outputs["image_features"]
        scale = outputs["logit_scale"]
        coarse = self.topology.embed(project_to_principal_components(image, self.num_components))
        return {
            "long": self.clip_loss(image, outputs["text_features"], scale),
            "short": self.clip_loss(coarse, outputs["short_text_features"], scale),
        }
