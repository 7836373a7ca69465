"""Multiple [CLS] tokens in open_clip's towers (Multi(n, m), docs/methods/topology.md §3).

`convert_to_multi_token` turns an open_clip CLIP in place into one whose towers pool m class
tokens through a shared projection to n dims and return (B, m·n) rows (the topology then
normalises each token's chunk). Parameter names stay open_clip's where the part exists
(`visual.class_embedding` is (m, w), `visual.positional_embedding` (m + L, w),
`visual.proj` and `text_projection` (w, n), both new); the text tower gains
`text_cls_embedding` (w,), one learnable [CLS] embedding shared by the slots, and
`text_cls_positional_embedding` (m, w), a positional row per slot.

Vision: m class embeddings N(0, w^-1/2), independently drawn, each with its own positional
row N(0, 0.01) (ours; the paper: "randomly initialised to break symmetry").
Text, two routes:
- "prepend" (from scratch, the paper's bidirectional text encoder): slots at positions
  0..m−1 before the text, no causal mask, pads hidden as keys from every query;
- "append" (a pretrained causal tower): slots after the text under the causal mask, pads
  hidden as keys, so each slot sees every non-pad token and the earlier slots, and the text
  tokens' own states are exactly the pretrained tower's.
Both keep the tokenizer's context; the sequence is context + m long.
"""

from __future__ import annotations

import torch
from open_clip.model import CLIP
from open_clip.transformer import VisionTransformer
from torch import nn

from training.towers import additive_key_mask, class_tokens, project_pooled

PAD_TOKEN_ID = 0  # open_clip's tokenizers pad with 0
CLS_POSITION_STD = 0.01
TEXT_ROUTES = ("prepend", "append")


class MultiTokenVisionTransformer(VisionTransformer):
    """open_clip's ViT with m class tokens first; pooled (B, m, w) -> (B, m·n)."""

    num_class_tokens: int

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, L, w)
        x = torch.cat([class_tokens(self, x.shape[0], x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        return self.ln_pre(self.patch_dropout(x))

    def _global_pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, : self.num_class_tokens], x[:, self.num_class_tokens :]

    def forward(self, x: torch.Tensor):
        x = self.transformer(self._embeds(x))
        pooled, tokens = self._pool(x)
        features = project_pooled(self, pooled)
        return (features, tokens) if self.output_tokens else features


class MultiTokenCLIP(CLIP):
    """open_clip's CLIP whose text tower pools m [CLS] slots (route "prepend" or "append")."""

    text_cls_route: str

    @property
    def num_text_class_tokens(self) -> int:
        return self.text_cls_positional_embedding.shape[0]

    def text_sequence(self, text: torch.Tensor, cast_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L + m, w) with positions, hidden keys (B, L + m))."""
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        slots = (self.text_cls_embedding + self.text_cls_positional_embedding).to(cast_dtype)
        slots = slots.unsqueeze(0).expand(x.shape[0], -1, -1)
        pads = text == PAD_TOKEN_ID
        visible = torch.zeros_like(pads[:, : slots.shape[1]])
        if self.text_cls_route == "prepend":
            return torch.cat([slots, x], dim=1), torch.cat([visible, pads], dim=1)
        return torch.cat([x, slots], dim=1), torch.cat([pads, visible], dim=1)

    def pooled_text_states(self, text: torch.Tensor) -> torch.Tensor:
        """(B, m, w) states of the m slots after ln_final."""
        x, hidden = self.text_sequence(text, self.transformer.get_cast_dtype())
        heads = self.transformer.resblocks[0].attn.num_heads
        mask = additive_key_mask(hidden, heads, x.dtype, causal=self.text_cls_route == "append")
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        m = self.num_text_class_tokens
        return x[:, :m] if self.text_cls_route == "prepend" else x[:, -m:]

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        if normalize:
            raise ValueError("a multi-token tower's features are normalised per token by its topology")
        return (self.pooled_text_states(text) @ self.text_projection).flatten(1)


def check_convertible(tower: nn.Module) -> None:
    visual = getattr(tower, "visual", None)
    if type(tower) is not CLIP or type(visual) is not VisionTransformer:
        raise ValueError(
            "topology.kind=multi needs an open_clip CLIP with its own text transformer and a "
            f"VisionTransformer image tower (got {type(tower).__name__} / {type(visual).__name__})"
        )
    if getattr(tower.visual, "attn_pool", None) is not None or tower.visual.pool_type != "tok":
        raise ValueError("topology.kind=multi needs class-token pooling (pool_type 'tok', no attentional pooler)")


def convert_vision(visual: VisionTransformer, m: int, n: int) -> None:
    width = visual.conv1.out_channels
    device = visual.positional_embedding.device
    patch_rows = visual.positional_embedding.data[1:]
    cls_rows = torch.randn(m, width, device=device) * CLS_POSITION_STD
    visual.__class__ = MultiTokenVisionTransformer
    visual.num_class_tokens = m
    visual.class_embedding = nn.Parameter(torch.randn(m, width, device=device) * width**-0.5)
    visual.positional_embedding = nn.Parameter(torch.cat([cls_rows, patch_rows]))
    visual.proj = nn.Parameter(torch.randn(width, n, device=device) * width**-0.5)
    visual.output_dim = m * n


def convert_text(tower: CLIP, m: int, n: int, route: str) -> None:
    if route not in TEXT_ROUTES:
        raise ValueError(f"unknown text [CLS] route {route!r}; known: {TEXT_ROUTES}")
    width = tower.transformer.width
    device = tower.positional_embedding.device
    tower.__class__ = MultiTokenCLIP
    tower.text_cls_route = route
    tower.text_cls_embedding = nn.Parameter(torch.randn(width, device=device) * CLS_POSITION_STD)
    tower.text_cls_positional_embedding = nn.Parameter(torch.randn(m, width, device=device) * CLS_POSITION_STD)
    tower.text_projection = nn.Parameter(torch.randn(width, n, device=device) * width**-0.5)


def convert_to_multi_token(tower: CLIP, m: int, n: int, text_route: str) -> CLIP:
    """In place: both towers pool m class tokens, each projected to n dims by one new
    projection per tower (a pretrained start keeps every other weight)."""
    check_convertible(tower)
    convert_vision(tower.visual, m, n)
    convert_text(tower, m, n, text_route)
    return tower
