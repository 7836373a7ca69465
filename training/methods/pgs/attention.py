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
    """open_clip's embedding up to its patch-dropout hook: (B, 1 + L, D), class token first,
    positional embeddings added."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, L, D)
    cls = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def gather_selected_tokens(tokens: torch.Tensor, keep_index: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1 + L, D), keep_index (B, K) patch indices -> (B, 1 + K, D)."""
    patches = tokens[:, 1:].gather(1, keep_index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([tokens[:, :1], patches], dim=1)


def build_key_padding_mask(hidden: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """hidden (B, K) bool -> additive mask (B * heads, 1 + K, 1 + K): -inf where the key is a
    hidden patch, 0 elsewhere; the class token (key 0) is never hidden, so no row is empty."""
    keys = torch.cat([torch.zeros_like(hidden[:, :1]), hidden], dim=1)  # (B, 1 + K)
    additive = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill_(keys, float("-inf"))
    length = keys.shape[1]
    return additive[:, None, None, :].expand(-1, num_heads, length, -1).reshape(-1, length, length)


def encode_selected_tokens(visual: nn.Module, tokens: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The rest of open_clip's VisionTransformer.forward on the selected tokens: ln_pre,
    transformer (with the mask), class-token pooling, projection. -> (B, embed_dim)."""
    x = visual.ln_pre(gather_selected_tokens(tokens, selection.keep_index))
    mask = None
    if selection.hidden is not None:
        mask = build_key_padding_mask(selection.hidden, count_heads(visual), x.dtype)
    x = visual.transformer(x, attn_mask=mask)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj if visual.proj is not None else pooled
