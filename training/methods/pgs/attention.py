"""Running open_clip's VisionTransformer on a selected token set: patch embedding, the
selection's gather, and a key-padding mask that hides tokens from attention in every head.

open_clip 3.3.0's `Transformer.forward(x, attn_mask)` hands the mask to each block's
`nn.MultiheadAttention` (or its custom `Attention`, which reads the same layout): a float
mask of shape (B * heads, T, T) is added to the attention logits, sample-major
(row b * heads + h), so -inf in a key column removes that token for every query and head.
"""

from __future__ import annotations

import torch
from torch import nn

from training.methods.pgs.selection import Selection
from training.towers import additive_key_mask, class_tokens, num_class_tokens, project_pooled
from training.towers import tower_dtype


def check_supported_tower(visual: nn.Module) -> None:
    """Selection needs a ViT pooled from its class token (a hidden token would otherwise
    still reach the pooled output)."""
    if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
        raise ValueError("CLIP-PGS needs an open_clip VisionTransformer image tower")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("CLIP-PGS needs class-token pooling (pool_type 'tok', no attentional pooler)")


def count_heads(visual: nn.Module) -> int:
    return visual.transformer.resblocks[0].attn.num_heads


def embed_patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """open_clip's embedding up to its patch-dropout hook: (B, c + L, D), the c class tokens
    first (one, or a multi-token topology's m), positional embeddings added."""
    x = visual.conv1(images.to(tower_dtype(visual))).flatten(2).transpose(1, 2)  # (B, L, D)
    return torch.cat([class_tokens(visual, x.shape[0], x.dtype), x], dim=1) + visual.positional_embedding.to(x.dtype)


def gather_selected_tokens(tokens: torch.Tensor, keep_index: torch.Tensor, num_prefix: int = 1) -> torch.Tensor:
    """tokens (B, c + L, D), keep_index (B, K) patch indices -> (B, c + K, D)."""
    patches = tokens[:, num_prefix:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :num_prefix], patches], dim=1)


def build_key_padding_mask(
    hidden: torch.Tensor, num_heads: int, dtype: torch.dtype, num_prefix: int = 1
) -> torch.Tensor:
    """hidden (B, K) bool -> additive mask (B * heads, c + K, c + K): -inf where the key is a
    hidden patch, 0 elsewhere; class tokens (the first c keys) are never hidden, so no row is
    empty."""
    keys = torch.cat([torch.zeros_like(hidden[:, :1]).expand(-1, num_prefix), hidden], dim=1)  # (B, c + K)
    return additive_key_mask(keys, num_heads, dtype)


def encode_selected_tokens(visual: nn.Module, tokens: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The rest of open_clip's VisionTransformer.forward on the selected tokens: ln_pre,
    transformer (with the mask), class-token pooling, projection. -> (B, embed_dim)."""
    prefix = num_class_tokens(visual)
    x = visual.ln_pre(gather_selected_tokens(tokens, selection.keep_index, prefix))
    mask = None
    if selection.hidden is not None:
        mask = build_key_padding_mask(selection.hidden, count_heads(visual), x.dtype, prefix)
    x = visual.transformer(x, attn_mask=mask)
    pooled, _ = visual._pool(x)
    return project_pooled(visual, pooled)
