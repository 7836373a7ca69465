"""SmartCLIP's masked scorer for evaluation (docs/methods/smartclip.md §6): each text scores
an image through its own dimension mask, S[a, b] = cos(z_I^a ⊙ m_b, z_T^b), behind the same
encode / similarity interface as any topology. The encoders return packed rows and the
similarity unpacks them."""

from __future__ import annotations

import torch
from torch import nn

from training.methods.smartclip.loss import EPS
from training.methods.topology.spaces import Sphere
from training.methods.smartclip.mask_network import encode_text_with_states


class MaskedScoringModel(nn.Module):
    """encode_image -> [z, z⊙z, 1, 0], encode_text -> [m⊙t, m, 0, 1] (each 2d + 2 wide). The
    two constant slots let `masked_similarity` undo any positive rescaling of a packed row
    (evaluation may L2-normalise features, and averages prompt features for zero-shot)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def tower(self) -> nn.Module:
        return self.model.tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        z = self.model.embed_image(images)  # (N, d) unit rows (SmartCLIP is sphere-only)
        ones = torch.ones_like(z[:, :1])
        return torch.cat([z, z * z, ones, torch.zeros_like(ones)], dim=1)

    def encode_image_states(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_class_states(images)

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        features, states = encode_text_with_states(self.model.tower, texts)
        masks, _ = self.model.mask_network(states, texts)  # (M, d)
        ones = torch.ones_like(features[:, :1])
        return torch.cat([masks * features, masks, torch.zeros_like(ones), ones], dim=1)


def masked_similarity(image, text):
    """(N, M) masked cosines from packed rows (numpy or torch): numerator and squared masked
    image norm as in training/methods/smartclip/loss.py, each divided by the rows' scales."""
    d = (image.shape[1] - 2) // 2
    scale = image[:, 2 * d][:, None] * text[:, 2 * d + 1][None, :]  # (N, M) product of row scales
    numerator = image[:, :d] @ text[:, :d].T / scale
    norm_sq = image[:, d : 2 * d] @ text[:, d : 2 * d].T / scale
    return numerator / (norm_sq + EPS) ** 0.5


class MaskedSphere(Sphere):
    """The sphere's template rule and gap on packed rows, ranked by the masked cosine."""

    def similarity(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return masked_similarity(u, v)
