"""Rebuilding a trained model for evaluation from its checkpoint alone (config inside).

Scorers: "plain" (default) is the cosine of the unmasked image and text embeddings, what
SmartCLIP's tables compare (METHODS.md §1.6); "masked" scores SmartCLIP checkpoints with the
mask of each text, S[a, b] = cos(z_I^a ⊙ m_b, z_T^b), through the same encode/similarity
interface: the encoders return packed features and the similarity unpacks them.
"""
from __future__ import annotations

import dataclasses

import cv2
import torch
from torch import nn

from training import checkpoint, transforms
from training.long_text import text_context_length
from training.losses.modular import EPS
from training.model import build_training_model, encode_text_with_states, tower_geometry
from training.towers import build_tokenizer

SIMILARITIES = {"sphere": lambda image, text: image @ text.T}  # cosine of unit features
SCORERS = ("plain", "masked")


class EvalPreprocess:
    """Encoded image bytes -> (3, H, W) tensor: centred square crop, resize, CLIP norm."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image_bytes: bytes) -> torch.Tensor:
        rgb = transforms.decode_rgb(image_bytes)
        box = transforms.center_box(*rgb.shape[:2])
        crop = transforms.apply_crop(rgb, box, self.image_size, cv2.INTER_AREA)
        return torch.from_numpy(transforms.normalize_image(crop))


class MaskedScoringModel(nn.Module):
    """encode_image -> [z, z⊙z, 1, 0], encode_text -> [m⊙t, m, 0, 1] (each 2d + 2 wide). The
    two constant slots let `masked_similarity` undo any positive rescaling of a packed row
    (evaluation may L2-normalise features, and averages prompt features for zero-shot)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        z = self.model.tower.encode_image(images, normalize=True)  # (N, d)
        ones = torch.ones_like(z[:, :1])
        return torch.cat([z, z * z, ones, torch.zeros_like(ones)], dim=1)

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        features, states = encode_text_with_states(self.model.tower, texts)
        masks, _ = self.model.mask_network(states, texts)  # (M, d)
        ones = torch.ones_like(features[:, :1])
        return torch.cat([masks * features, masks, torch.zeros_like(ones), ones], dim=1)


def masked_similarity(image, text):
    """(N, M) masked cosines from packed rows (numpy or torch): numerator and squared masked
    image norm as in training/losses/modular.py, each divided by the rows' scales."""
    d = (image.shape[1] - 2) // 2
    scale = image[:, 2 * d][:, None] * text[:, 2 * d + 1][None, :]  # (N, M) product of row scales
    numerator = image[:, :d] @ text[:, :d].T / scale
    norm_sq = image[:, d:2 * d] @ text[:, d:2 * d].T / scale
    return numerator / (norm_sq + EPS) ** 0.5


def build_scoring(model: nn.Module, scorer: str) -> tuple[nn.Module, object]:
    """(model with encode_image / encode_text, similarity) for a scorer name."""
    if scorer == "plain":
        return model.tower, SIMILARITIES["sphere"]
    if scorer == "masked":
        if model.mask_network is None:
            raise ValueError("the masked scorer needs a SmartCLIP checkpoint (it has no mask network)")
        return MaskedScoringModel(model), masked_similarity
    raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")


def load_inference_model(uri: str, device: str = "cpu", scorer: str = "plain") -> checkpoint.InferenceModel:
    directory = checkpoint.fetch_checkpoint(uri)
    config = checkpoint.load_config(directory)
    # The checkpoint holds every weight: build the bare architecture, never re-fetch `pretrained`.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=None))
    model = build_training_model(config)
    model.load_state_dict(checkpoint.load_model_state_dict(directory))
    model.eval().to(device)
    encoder, similarity = build_scoring(model, scorer)
    state = checkpoint.read_state(directory)
    info = {"path": uri, "resolved": str(directory), "step": state["step"],
            "method": config.method, "arch": config.model.arch, "topology": "sphere", "scorer": scorer,
            "manifest_digests": [state.get("manifest_digest")], "data": state.get("data_uri"),
            "code_version": state.get("code_version")}
    context = text_context_length(config.model.arch, config.model.text_positions_kept,
                                  config.model.text_stretch_factor)
    return checkpoint.InferenceModel(model=encoder, preprocess=EvalPreprocess(tower_geometry(model)[0]),
                                     tokenizer=build_tokenizer(config.model.arch, context),
                                     similarity=similarity, info=info)
