"""The trained model: an open_clip tower pair plus the parts a method adds around it
(patch selection in the vision tower), returning a dict of named outputs."""
from __future__ import annotations

import torch
from torch import nn

from training.config import LossConfig, MaskingConfig, ModelConfig
from training.methods.flip import RandomPatchDrop
from training.towers import build_tower_model

PATCH_SELECTORS = {"none": None, "random": RandomPatchDrop}


class ContrastiveModel(nn.Module):
    """Wraps an open_clip CLIP; `forward` returns normalised features and the logit scale."""

    def __init__(self, tower: nn.Module, patch_selector: nn.Module | None, max_logit_scale: float):
        super().__init__()
        self.tower = tower
        self.max_logit_scale = max_logit_scale
        if patch_selector is not None:
            tower.visual.patch_dropout = patch_selector  # open_clip's hook after pos. embed.

    @property
    def patch_selector(self) -> nn.Module:
        return self.tower.visual.patch_dropout

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        return {"image_features": self.tower.encode_image(images, normalize=True),
                "text_features": self.tower.encode_text(texts, normalize=True),
                "logit_scale": self.tower.logit_scale.exp()}

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clip the temperature at 1 / max_logit_scale (open_clip clamps after each step)."""
        self.tower.logit_scale.clamp_(0, torch.log(torch.tensor(self.max_logit_scale)).item())


def build_patch_selector(masking: MaskingConfig) -> nn.Module | None:
    if masking.kind not in PATCH_SELECTORS:
        raise ValueError(f"unknown patch selection {masking.kind!r}; known: {sorted(PATCH_SELECTORS)}")
    selector = PATCH_SELECTORS[masking.kind]
    return None if selector is None else selector(masking.ratio)


def build_model(model: ModelConfig, masking: MaskingConfig, loss: LossConfig) -> ContrastiveModel:
    tower = build_tower_model(model.arch, pretrained=model.pretrained)
    if model.pretrained is None:
        with torch.no_grad():
            tower.logit_scale.fill_(loss.init_logit_scale)
    return ContrastiveModel(tower, build_patch_selector(masking), loss.max_logit_scale)


def tower_geometry(model: ContrastiveModel) -> tuple[int, int]:
    """(image size, patch size) of the vision tower."""
    visual = model.tower.visual
    image_size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    patch = visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size
    return int(image_size), int(patch)
