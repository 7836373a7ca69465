"""FLIP's random patch dropping (Li et al., 2023): a random subset of patch tokens is removed
from the sequence before the vision transformer, so the step really gets cheaper."""

from __future__ import annotations

import torch
from torch import nn


def compute_num_keep(num_patches: int, ratio: float) -> int:
    """Patch tokens kept when `ratio` of them is dropped: floor(L * (1 - ratio)), at least
    one (open_clip's PatchDropout rule; the rounding to 1e-6 absorbs float noise such as
    100 * (1 - 0.9) = 9.999999999999998)."""
    return max(1, int(round(num_patches * (1.0 - ratio), 6)))


def random_masking(
    x: torch.Tensor, num_keep: int, generator: torch.Generator | None, num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Keep `num_keep` random patch tokens of x (B, c + L, D); the c class tokens stay first.

    MAE's recipe: draw noise per patch, argsort it, keep the first tokens with a gather.
    """
    noise = torch.rand((x.shape[0], x.shape[1] - num_prefix_tokens), device=x.device, generator=generator)
    return keep_lowest_noise(x, noise, num_keep, num_prefix_tokens)


def keep_lowest_noise(x: torch.Tensor, noise: torch.Tensor, num_keep: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """x (B, c + L, D), noise (B, L) -> the c class tokens and the num_keep patches of lowest noise."""
    cls_token, patches = x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]  # (B, c, D), (B, L, D)
    keep = noise.argsort(dim=1)[:, :num_keep]  # (B, K) indices of kept patches
    kept = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
    return torch.cat([cls_token, kept], dim=1)  # (B, c + K, D)


class RandomPatchDrop(nn.Module):
    """Drop-in for open_clip's `visual.patch_dropout` hook (after positional embeddings,
    before ln_pre). Identity in eval mode. `generator` is reseeded per step by the loop so a
    resumed run draws the same masks. The first `num_prefix_tokens` (the class token, or a
    multi-token topology's m) are never dropped."""

    def __init__(self, ratio: float, num_prefix_tokens: int = 1):
        super().__init__()
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.num_prefix_tokens = num_prefix_tokens
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.ratio == 0.0:
            return x
        num_patches = x.shape[1] - self.num_prefix_tokens
        noise = self.draw_noise((x.shape[0], num_patches), x.device)
        return keep_lowest_noise(x, noise, compute_num_keep(num_patches, self.ratio), self.num_prefix_tokens)

    def draw_noise(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        """(B, L) uniform noise from the step's generator; the lowest num_keep are kept."""
        return torch.rand(shape, device=device, generator=self.generator)
