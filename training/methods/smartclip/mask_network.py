"""SmartCLIP's mask network (Xie et al., CVPR 2025, §4; docs/methods/smartclip.md §3): from a caption's
token states it picks the dimensions of the image embedding that the caption speaks about.

One transformer block over the text tower's final token states (pads key-masked, attention
bidirectional), attention pooling with one learned query to the embedding width, a sigmoid
and a straight-through binary mask (forward exactly 0/1, backward the sigmoid's gradient).
"""

from __future__ import annotations

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn


def compute_padding_mask(texts: torch.Tensor) -> torch.Tensor:
    """(B, L) bool, True after the end-of-text token (open_clip's EOT has the largest id, the
    rule `text_global_pool` uses to pick the caption's feature)."""
    eot = texts.argmax(dim=-1, keepdim=True)  # (B, 1)
    return torch.arange(texts.shape[1], device=texts.device)[None, :] > eot


def binarize_straight_through(probs: torch.Tensor) -> torch.Tensor:
    """1[p > 0.5] in the forward pass, d/dp = 1 in the backward pass (Bengio et al. 2013)."""
    hard = (probs > 0.5).to(probs.dtype)
    return hard + (probs - probs.detach())  # (p − p) is exactly 0: the forward value stays 0/1


class AttentionPool(nn.Module):
    """One learned query cross-attending to the token states (CoCa/open_clip
    `AttentionalPooler` with LayerNorm on query and keys, plus a key-padding mask)."""

    def __init__(self, out_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, out_dim) * out_dim**-0.5)
        self.ln_q = nn.LayerNorm(out_dim)
        self.ln_k = nn.LayerNorm(context_dim)
        self.attn = nn.MultiheadAttention(out_dim, heads, kdim=context_dim, vdim=context_dim, batch_first=True)

    def forward(self, states: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(states)  # (B, L, w)
        query = self.ln_q(self.query).expand(states.shape[0], -1, -1)  # (B, 1, d)
        pooled, _ = self.attn(query, keys, keys, key_padding_mask=padding, need_weights=False)
        return pooled[:, 0]  # (B, d)


class MaskNetwork(nn.Module):
    """Token states (B, L, w) and token ids (B, L) -> a binary mask (B, d) with
    straight-through gradients, and the sigmoid probabilities (B, d)."""

    def __init__(self, width: int, heads: int, embed_dim: int, init_bias: float, act_layer: type[nn.Module] = nn.GELU):
        super().__init__()
        self.heads = heads
        self.block = ResidualAttentionBlock(width, heads, mlp_ratio=4.0, act_layer=act_layer, batch_first=True)
        self.pool = AttentionPool(embed_dim, width, max(1, embed_dim // 64))
        self.bias = nn.Parameter(torch.full((embed_dim,), float(init_bias)))
        # The pool's output starts at zero so that logits = bias: every mask starts the same,
        # all ones for bias > 0, and the fine-tune starts exactly at the pretrained model.
        nn.init.zeros_(self.pool.attn.out_proj.weight)
        nn.init.zeros_(self.pool.attn.out_proj.bias)

    def forward(self, states: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        padding = compute_padding_mask(texts)  # (B, L)
        # Additive key mask per head (B·heads, L, L): padded keys get −inf; queries at pads
        # still see the real tokens, so no row is all −inf.
        key_bias = torch.zeros(padding.shape, dtype=states.dtype, device=states.device)
        key_bias = key_bias.masked_fill(padding, float("-inf"))
        attn_mask = key_bias[:, None, None, :].expand(-1, self.heads, states.shape[1], -1)
        hidden = self.block(states, attn_mask=attn_mask.reshape(-1, *attn_mask.shape[2:]))
        probs = torch.sigmoid(self.pool(hidden, padding) + self.bias)  # (B, d)
        return binarize_straight_through(probs), probs


def encode_text_with_states(tower: nn.Module, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit text features (B, d), token states after ln_final (B, L, w)) from open_clip's own
    `encode_text`; the states are read by a forward hook on `ln_final`."""
    states = []
    handle = tower.ln_final.register_forward_hook(lambda module, args, out: states.append(out))
    try:
        features = tower.encode_text(texts, normalize=True)
    finally:
        handle.remove()
    return features, states[0]
