"""SmartCLIP's modular contrastive loss (Xie et al., CVPR 2025, Eqs. 3-7 and 9) and the L1
sparsity term (Eq. 8), without a B x B x d tensor (docs/methods/smartclip.md §5).

Every pair (image a, text b), positive or negative, compares the image embedding masked by
*text b's* mask with text b:  S[a, b] = cos(z_I^a ⊙ m_b, z_T^b). L_ctrI is the cross-entropy
of each row of s·S (target: the diagonal), L_ctrT of each column; Eq. 9 sums them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.clip.loss import gather_features

EPS = 1e-8  # keeps the all-zero mask finite: S = 0 / sqrt(0 + eps) = 0


def compute_masked_cosine(
    image: torch.Tensor, text: torch.Tensor, masks: torch.Tensor, eps: float = EPS
) -> torch.Tensor:
    """S (A, B) with S[a, b] = cos(image[a] ⊙ masks[b], text[b]); image (A, d) any scale,
    text (B, d) unit rows, masks (B, d) with 0/1 forward values. Two matrix products:

        numerator  z_I^a · (m_b ⊙ z_T^b)       = image @ (masks * text).T
        norm²      Σ_k z_I^a[k]² m_b[k]        = (image * image) @ masks.T

    The norm is linear in m: equal to ‖z_I ⊙ m‖² = Σ z² m² for binary m, and the natural
    straight-through gradient (z² rather than 2·m·z²) with respect to the mask.
    """
    numerator = image @ (masks * text).T  # (A, B)
    norm_sq = (image * image) @ masks.T  # (A, B)
    return numerator / torch.sqrt(norm_sq + eps)


def compute_sparsity(masks: torch.Tensor) -> torch.Tensor:
    """Eq. 8: ‖m‖₁ summed over dimensions (not divided by d), averaged over the batch."""
    return masks.abs().sum(dim=1).mean()


class ModularContrastiveLoss(nn.Module):
    """{"align": λ_align·(L_ctrI + L_ctrT), "sparsity": λ_sparsity·‖m‖₁} from the model's
    image features, unit text features, text masks and logit scale; features and masks are
    gathered across workers with gradients (as in `ContrastiveLoss`)."""

    def __init__(
        self,
        lambda_align: float,
        lambda_sparsity: float,
        rank: int = 0,
        world_size: int = 1,
        gather_with_grad: bool = True,
        local_loss: bool = False,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        self.lambda_align = lambda_align
        self.lambda_sparsity = lambda_sparsity
        self.rank = rank
        self.world_size = world_size
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.label_smoothing = label_smoothing

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return gather_features(tensor, self.rank, self.world_size, self.gather_with_grad, self.local_loss)

    def compute_logits(self, image, text, masks, scale):
        """(row logits, column logits (as rows), labels): L_ctrI over texts, L_ctrT over images."""
        all_image = self.gather(image)
        all_text = self.gather(text)
        all_masks = self.gather(masks)
        if self.local_loss:  # this worker's rows S[a_local, :] and columns S[:, b_local]
            rows = scale * compute_masked_cosine(image, all_text, all_masks)  # (B, B_global)
            columns = scale * compute_masked_cosine(all_image, text, masks).T  # (B, B_global)
            offset = self.rank * image.shape[0]
        else:
            rows = scale * compute_masked_cosine(all_image, all_text, all_masks)  # (B_global, B_global)
            columns = rows.T
            offset = 0
        labels = torch.arange(rows.shape[0], device=rows.device) + offset
        return rows, columns, labels

    def forward(self, outputs: dict) -> dict:
        masks = outputs["text_masks"]
        rows, columns, labels = self.compute_logits(
            outputs["image_features"], outputs["text_features"], masks, outputs["logit_scale"]
        )
        ctr_i = F.cross_entropy(rows, labels, label_smoothing=self.label_smoothing)  # Eq. 6
        ctr_t = F.cross_entropy(columns, labels, label_smoothing=self.label_smoothing)  # Eq. 7
        return {
            "align": self.lambda_align * (ctr_i + ctr_t),
            "sparsity": self.lambda_sparsity * compute_sparsity(masks),
        }
