"""What evaluation needs from a model, whichever way it was loaded: a checkpoint of ours
(training/inference.py) or an open_clip model (training/off_the_shelf.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InferenceModel:
    """What evaluation needs from a checkpoint."""

    model: torch.nn.Module  # encode_image / encode_text -> the topology's embeddings, eval mode
    preprocess: object  # callable: encoded image bytes -> (3, H, W) float tensor
    tokenizer: object  # callable: list[str] -> LongTensor (N, context)
    topology: object  # training/methods/topology/spaces.py: similarity, template rule, modality gap
    info: dict

    def similarity(self, image, text):
        """(N, D), (M, D) embeddings (NumPy or torch) -> (N, M) scores of the topology."""
        if isinstance(image, torch.Tensor):
            return self.topology.similarity(image, text)
        return self.topology.score(image, text)
