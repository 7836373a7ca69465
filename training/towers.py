"""Vision-language towers built from open_clip model configs.

The standard sizes (ViT-B-32, ViT-B-16, ViT-L-14, ...) come from open_clip's own config
registry; the tiny sizes for CPU runs live in `training/model_configs/` and are registered
into the same registry, so every tower is created by `open_clip.create_model(<arch>)`.
Also here: what the data stage and evaluation prepare samples for (`SampleGeometry`), and the
ViT sequence helpers every method shares, written for c class tokens at the front (1 for
open_clip's own towers, m for Multi's, training/methods/topology/multi_token.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from pipelines.console import quiet_open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_ARCHS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))


def register_tiny_configs() -> None:
    """Add our CPU-sized configs to open_clip's registry (idempotent)."""
    if not set(TINY_ARCHS) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def build_tower_model(arch: str, *, pretrained: str | None = None):
    """An open_clip CLIP model for `arch`, optionally loading a local checkpoint file."""
    register_tiny_configs()
    known = open_clip.list_models()
    if arch not in known:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(known)}")
    # A bare tower is what we asked for without `pretrained` (weights are loaded after, or
    # trained from scratch): its "initialized randomly" warning is dropped for this call.
    with quiet_open_clip(None if pretrained else "No pretrained weights loaded for model"):
        return open_clip.create_model(arch, pretrained=pretrained)


def tower_dtype(visual) -> torch.dtype:
    """The dtype an image tower computes in (a ViT, a ResNet or a timm trunk alike): images
    reach the model in float32 and are cast to it there."""
    return next(visual.parameters()).dtype


def build_tokenizer(arch: str, context_length: int | None = None):
    """open_clip's tokenizer of `arch`, with another context (stretched text towers) if given."""
    register_tiny_configs()
    with quiet_open_clip():
        return open_clip.get_tokenizer(arch, context_length=context_length)


@dataclass(frozen=True)
class SampleGeometry:
    """What a sample is prepared for, read from the built towers (`model.sample_geometry`)."""

    arch: str  # its tokenizer
    image_size: int
    patch_size: int  # edge scores per patch; a convolutional tower's "patch" is the image
    context_length: int  # the text tower's own context (stretched by Long-CLIP)

    def tokenizer(self):
        return build_tokenizer(self.arch, self.context_length)


def num_class_tokens(visual: nn.Module) -> int:
    """Class tokens at the front of a ViT's sequence (1 for open_clip's own)."""
    return getattr(visual, "num_class_tokens", 1)


def class_tokens(visual: nn.Module, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, c, w) class token(s) of a ViT, for both open_clip's (w,) and our (m, w) tables."""
    table = visual.class_embedding.to(dtype)
    return table.reshape(1, -1, table.shape[-1]).expand(batch, -1, -1)


def project_pooled(visual: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Pooled (B, w) or (B, m, w) class states -> (B, E) raw features (E = m·n)."""
    projected = pooled @ visual.proj if visual.proj is not None else pooled
    return projected.flatten(1)


def pooled_class_states(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, c·w) class-token state(s) of an open_clip ViT (one or m), before the projection."""
    pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
    return pooled.flatten(1)


def additive_key_mask(
    hidden_keys: torch.Tensor, num_heads: int, dtype: torch.dtype, causal: bool = False
) -> torch.Tensor:
    """hidden_keys (B, T) bool -> float mask (B·heads, T, T) in open_clip's layout (sample
    major): −inf where the key is hidden (and above the diagonal when causal), 0 elsewhere."""
    batch, length = hidden_keys.shape
    mask = torch.zeros((batch, 1, length), dtype=dtype, device=hidden_keys.device)
    mask = mask.masked_fill(hidden_keys[:, None, :], float("-inf")).expand(-1, length, -1)
    if causal:
        future = torch.ones(length, length, dtype=torch.bool, device=hidden_keys.device).triu_(1)
        mask = mask.masked_fill(future, float("-inf"))
    return mask[:, None].expand(-1, num_heads, -1, -1).reshape(-1, length, length)
