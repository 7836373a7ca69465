"""Vision-language towers built from open_clip model configs.

The standard sizes (ViT-B-32, ViT-B-16, ViT-L-14, ...) come from open_clip's own config
registry; the tiny sizes for CPU runs live in `training/model_configs/` and are registered
into the same registry, so every tower is created by `open_clip.create_model(<arch>)`.
"""

from __future__ import annotations

from pathlib import Path

import open_clip
import torch

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
