"""Batch encoders around a checkpoint's model: plain callable classes (model loaded once in
`__init__`) that the evaluation job runs as Ray Data actors and tests call directly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from training.inference import load_inference_model

INDEX, PATH, TEXT, EMBEDDING = "index", "path", "text", "embedding"


class ImageEncoder:
    """Rows {index, path} -> {index, embedding}: unit image features of each file."""

    def __init__(self, checkpoint_uri: str, device: str = "cpu", scorer: str = "plain"):
        self.bundle, self.device = load_inference_model(checkpoint_uri, device, scorer), device

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        pixels = torch.stack([self.bundle.preprocess(Path(p).read_bytes()) for p in batch[PATH]])
        features = self.bundle.model.encode_image(pixels.to(self.device), normalize=True)
        return {INDEX: batch[INDEX], EMBEDDING: features.float().cpu().numpy()}


class TextEncoder:
    """Rows {index, text} -> {index, embedding}: unit text features."""

    def __init__(self, checkpoint_uri: str, device: str = "cpu", scorer: str = "plain"):
        self.bundle, self.device = load_inference_model(checkpoint_uri, device, scorer), device

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        tokens = self.bundle.tokenizer([str(t) for t in batch[TEXT]]).to(self.device)
        features = self.bundle.model.encode_text(tokens, normalize=True)
        return {INDEX: batch[INDEX], EMBEDDING: features.float().cpu().numpy()}


def stack_by_index(rows: list[dict]) -> np.ndarray:
    """Embeddings (N, D) in input order from rows that came back in any order."""
    ordered = sorted(rows, key=lambda r: int(r[INDEX]))
    return np.stack([np.asarray(r[EMBEDDING], dtype=np.float32) for r in ordered])
