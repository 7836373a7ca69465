"""CLIP-PGS (Pei et al., "Seeing What Matters: Empowering CLIP with Patch
Generation-to-Selection"): edge- and similarity-guided patch dropping, in the released
code's form (`reference`) and the paper's (`paper`). See docs/methods/pgs.md."""

from __future__ import annotations

import torch
from torch import nn

from training.config import PGSConfig
from training.methods.pgs.attention import check_supported_tower, embed_patch_tokens, encode_selected_tokens
from training.methods.pgs.selection import (
    Selection,
    build_sobel_kernels,
    compute_drop_bounds,
    compute_mixed_similarity,
    compute_reference_edges,
    extract_pixel_patches,
    remove_shared_hidden,
    select_paper,
    select_reference,
    standardize_patches,
)
from training.towers import num_class_tokens

PGS_MODES = ("reference", "paper")
PGS_COMPACTIONS = ("batch_min", "static", "auto")  # auto: resolved before a model is built


def check_pgs_config(config: PGSConfig) -> None:
    if config.mode not in PGS_MODES:
        raise ValueError(f"unknown pgs.mode {config.mode!r}; known: {PGS_MODES}")
    if config.compaction not in PGS_COMPACTIONS:
        raise ValueError(f"unknown pgs.compaction {config.compaction!r}; known: {PGS_COMPACTIONS}")
    if not 0.0 <= config.min_mask_ratio <= config.max_mask_ratio < 1.0:
        raise ValueError(
            "need 0 <= pgs.min_mask_ratio <= pgs.max_mask_ratio < 1, got "
            f"{config.min_mask_ratio}, {config.max_mask_ratio}"
        )
    if not 0.0 < config.candidate_ratio < 1.0:
        raise ValueError(f"pgs.candidate_ratio must be in (0, 1), got {config.candidate_ratio}")
    if config.sinkhorn_iters < 1 or config.sinkhorn_reg <= 0:
        raise ValueError("pgs.sinkhorn_iters must be >= 1 and pgs.sinkhorn_reg > 0")


class PGSSelector(nn.Module):
    """Chooses, per training step, which patch tokens each image keeps. No parameters;
    `generator` is reseeded per step by the loop like FLIP's. Selection runs under no-grad
    in float32 on the tokens' device."""

    def __init__(self, config: PGSConfig, patch_size: int):
        super().__init__()
        check_pgs_config(config)
        self.config = config
        self.patch_size = patch_size
        self.generator: torch.Generator | None = None
        self.register_buffer("sobel_kernels", build_sobel_kernels(), persistent=False)

    def draw_noise(self, count: int, shape, device) -> list[torch.Tensor]:
        return [torch.rand(shape, device=device, generator=self.generator) for _ in range(count)]

    @torch.no_grad()
    def forward(
        self, tokens: torch.Tensor, images: torch.Tensor, edge_scores: torch.Tensor | None, epoch_fraction: float
    ) -> Selection:
        """tokens (B, L, D) patch tokens with positions; images (B, 3, H, W) CLIP-normalised;
        edge_scores (B, L) per-patch Sobel scores (paper mode); epoch_fraction = alpha."""
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            std_patches = standardize_patches(extract_pixel_patches(images.float(), self.patch_size))
            similarity = compute_mixed_similarity(tokens.float(), std_patches, epoch_fraction)  # (B, L, L)
            if self.config.mode == "reference":
                grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
                return self.select_reference(similarity, std_patches, grid)
            return self.select_paper(similarity, edge_scores)

    def select_reference(self, similarity, std_patches, grid: tuple[int, int]) -> Selection:
        edges = None
        if self.config.use_edges:  # the released (degenerate) edge map, from the pixels
            edges = compute_reference_edges(std_patches, grid, self.sobel_kernels)
        noise = self.draw_noise(2, similarity.shape[:2], similarity.device)
        return select_reference(similarity, edges, self.config, *noise)

    def select_paper(self, similarity, edge_scores: torch.Tensor | None) -> Selection:
        edges = None
        if self.config.use_edges:  # the stored Sobel maps, reduced per patch by the loader
            if edge_scores is None:
                raise ValueError("pgs paper mode with edges needs the batch's edge_scores")
            edges = edge_scores.float()
        noise = self.draw_noise(3, similarity.shape[:2], similarity.device)
        return select_paper(similarity, edges, self.config, *noise)


def encode_image_with_selection(
    visual: nn.Module,
    selector: PGSSelector,
    images: torch.Tensor,
    edge_scores: torch.Tensor | None,
    epoch_fraction: float,
):
    """(pooled image embedding (B, E), selection): the vision tower on the selected tokens."""
    tokens = embed_patch_tokens(visual, images)  # (B, c + L, D), c class tokens
    selection = selector(tokens[:, num_class_tokens(visual) :].detach(), images, edge_scores, epoch_fraction)
    if selector.config.compaction != "static":  # batch_min (or auto left unresolved, its eager meaning)
        selection = remove_shared_hidden(selection)
    return encode_selected_tokens(visual, tokens, selection), selection


def summarize_selection(selection: Selection, num_patches: int) -> dict:
    """Metrics of the realised drop (device tensors, no host synchronisation) and the
    number of patch tokens physically in the sequence."""
    dropped = selection.num_dropped / num_patches
    return {
        "masking/kept_patches": num_patches - selection.num_dropped.mean(),
        "masking/drop_fraction": dropped.mean(),
        "masking/drop_fraction_min": dropped.min(),
        "masking/drop_fraction_max": dropped.max(),
        "masking/sequence_patches": float(selection.keep_index.shape[1]),
    }  # a host int


__all__ = [
    "PGSSelector",
    "PGS_COMPACTIONS",
    "PGS_MODES",
    "Selection",
    "check_pgs_config",
    "check_supported_tower",
    "compute_drop_bounds",
    "encode_image_with_selection",
    "remove_shared_hidden",
    "summarize_selection",
]
