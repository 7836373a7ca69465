"""The trained model: an open_clip tower pair plus the parts a method adds around it
(patch selection in the vision tower), returning a dict of named outputs."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import LossConfig, MaskingConfig, ModelConfig, PGSConfig
from training.methods.flip import RandomPatchDrop
from training.methods.pgs import (PGSSelector, check_supported_tower, encode_image_with_selection,
                                  summarize_selection)
from training.towers import build_tower_model

# Selectors in open_clip's patch-dropout hook see only the tokens; token selectors (PGS)
# also read the images and edge scores, so the model runs the vision tower around them.
PATCH_SELECTORS = {"none": None, "random": RandomPatchDrop, "pgs": None}
TOKEN_SELECTORS = {"pgs": PGSSelector}


class ContrastiveModel(nn.Module):
    """Wraps an open_clip CLIP; `forward` returns normalised features and the logit scale."""

    def __init__(self, tower: nn.Module, patch_selector: nn.Module | None, max_logit_scale: float,
                 token_selector: PGSSelector | None = None):
        super().__init__()
        self.tower = tower
        self.max_logit_scale = max_logit_scale
        if patch_selector is not None:
            tower.visual.patch_dropout = patch_selector  # open_clip's hook after pos. embed.
        if token_selector is not None:
            check_supported_tower(tower.visual)
        self.token_selector = token_selector

    @property
    def patch_selector(self) -> nn.Module:
        return self.tower.visual.patch_dropout

    def forward(self, images: torch.Tensor, texts: torch.Tensor, edge_scores: torch.Tensor | None = None,
                epoch_fraction: float = 0.0) -> dict:
        """edge_scores (B, L) and epoch_fraction (epoch / epochs) feed a token selector; the
        outputs then also hold its `masking/...` statistics (device tensors)."""
        image_features, selection_stats = self.encode_image_for_training(images, edge_scores, epoch_fraction)
        return {"image_features": image_features,
                "text_features": self.tower.encode_text(texts, normalize=True),
                "logit_scale": self.tower.logit_scale.exp(), **selection_stats}

    def encode_image_for_training(self, images, edge_scores, epoch_fraction) -> tuple[torch.Tensor, dict]:
        if self.token_selector is None or not self.training:  # evaluation sees every token
            return self.tower.encode_image(images, normalize=True), {}
        pooled, selection = encode_image_with_selection(self.tower.visual, self.token_selector, images,
                                                        edge_scores, epoch_fraction)
        num_patches = self.tower.visual.positional_embedding.shape[0] - 1
        return F.normalize(pooled, dim=-1), summarize_selection(selection, num_patches)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clip the temperature at 1 / max_logit_scale (open_clip clamps after each step)."""
        self.tower.logit_scale.clamp_(0, torch.log(torch.tensor(self.max_logit_scale)).item())


def build_patch_selector(masking: MaskingConfig) -> nn.Module | None:
    if masking.kind not in PATCH_SELECTORS:
        raise ValueError(f"unknown patch selection {masking.kind!r}; known: {sorted(PATCH_SELECTORS)}")
    selector = PATCH_SELECTORS[masking.kind]
    return None if selector is None else selector(masking.ratio)


def build_token_selector(masking: MaskingConfig, pgs: PGSConfig, patch_size: int) -> PGSSelector | None:
    if masking.kind not in TOKEN_SELECTORS:
        return None
    if masking.ratio != 0.0:
        raise ValueError("CLIP-PGS takes its mask ratios from pgs.min_mask_ratio / pgs.max_mask_ratio; "
                         f"leave masking.ratio at 0 (got {masking.ratio})")
    return TOKEN_SELECTORS[masking.kind](pgs, patch_size)


def build_model(model: ModelConfig, masking: MaskingConfig, loss: LossConfig,
                pgs: PGSConfig = PGSConfig()) -> ContrastiveModel:
    tower = build_tower_model(model.arch, pretrained=model.pretrained)
    if model.pretrained is None:
        with torch.no_grad():
            tower.logit_scale.fill_(loss.init_logit_scale)
    return ContrastiveModel(tower, build_patch_selector(masking), loss.max_logit_scale,
                            build_token_selector(masking, pgs, tower.visual.patch_size[0]))


def tower_geometry(model: ContrastiveModel) -> tuple[int, int]:
    """(image size, patch size) of the vision tower."""
    visual = model.tower.visual
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    return int(image_size), int(patch)
