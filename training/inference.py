"""Rebuilding a trained model for evaluation from its checkpoint alone (config inside).

Scorers: "plain" (default) ranks by the checkpoint's own topology (training/methods/topology/spaces.py:
its embedding, similarity, template rule and gap; the cosine of the unmasked embeddings on
the sphere, what SmartCLIP's tables compare, docs/methods/smartclip.md §6); "masked" scores SmartCLIP
checkpoints with the mask of each text, S[a, b] = cos(z_I^a ⊙ m_b, z_T^b), through the same
encode/topology interface: the encoders return packed features and the similarity unpacks them.
"""

from __future__ import annotations

import dataclasses

import cv2
import torch
from torch import nn

from training import checkpoint, data_mixture, transforms
from training.inference_model import InferenceModel
from training.methods.smartclip.scoring import MaskedScoringModel, MaskedSphere
from training.methods.recipes import resolve_auto_fields
from training.off_the_shelf import is_open_clip_ref, load_open_clip_inference
from training.model import ContrastiveModel, build_training_model, sample_geometry
from training.methods.topology.spaces import Sphere

SCORER_NAMES = ("plain", "masked")


class EvalPreprocess:
    """Encoded image bytes -> (3, H, W) tensor: centred square crop, resize, CLIP norm."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image_bytes: bytes) -> torch.Tensor:
        rgb = transforms.decode_rgb(image_bytes)
        box = transforms.center_box(*rgb.shape[:2])
        crop = transforms.apply_crop(rgb, box, self.image_size, cv2.INTER_AREA)
        return torch.from_numpy(transforms.normalize_image(crop))


class TopologyEncoder(nn.Module):
    """encode_image / encode_text -> the model's topology embeddings (what training scores)."""

    def __init__(self, model: ContrastiveModel):
        super().__init__()
        self.model = model

    @property
    def tower(self) -> nn.Module:
        """The open_clip CLIP inside (what modality inversion runs through, frozen)."""
        return self.model.tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.embed_image(images)

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        return self.model.embed_text(texts)

    def encode_image_states(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.image_class_states(images)


def build_scoring(model: ContrastiveModel, scorer: str) -> tuple[nn.Module, Sphere]:
    """(module with encode_image / encode_text, the topology evaluation scores with)."""
    if scorer == "plain":
        return TopologyEncoder(model), model.topology
    if scorer == "masked":
        if model.mask_network is None:
            raise ValueError("the masked scorer needs a SmartCLIP checkpoint (it has no mask network)")
        return MaskedScoringModel(model), MaskedSphere(model.topology.n, model.topology.m)
    raise ValueError(f"unknown scorer {scorer!r}; known: {', '.join(SCORER_NAMES)}")


def load_inference_model(
    uri: str, device: str = "cpu", scorer: str = "plain", cache_dir: str | None = None
) -> InferenceModel:
    """A checkpoint (or run directory: its latest complete checkpoint, whose own URI is
    info["checkpoint_uri"]) of this project, or `open_clip:ARCH=WEIGHTS`
    (training/off_the_shelf.py), as evaluation uses it. An s3:// checkpoint is downloaded into
    `cache_dir` when given (one copy per machine)."""
    if is_open_clip_ref(uri):
        return load_open_clip_inference(uri, device, scorer)
    source, directory = checkpoint.locate_checkpoint(uri, cache_dir)
    config = resolve_auto_fields(checkpoint.load_config(directory))  # before `pretrained` is dropped
    # The checkpoint holds every weight: build the bare architecture, never re-fetch `pretrained`.
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, pretrained=None))
    model = build_training_model(config)
    model.load_state_dict(checkpoint.load_model_state_dict(directory))
    model.eval().to(device)
    encoder, topology = build_scoring(model, scorer)
    encoder.eval()
    state = checkpoint.read_state(directory)
    info = {
        "path": uri,
        "checkpoint_uri": source,
        "resolved": str(directory),
        "step": state["step"],
        "method": config.method,
        "arch": config.model.arch,
        "topology": model.topology.describe(),
        "scorer": scorer,
        **data_mixture.saved_sources(state),
        "code_version": state.get("code_version"),
    }
    geometry = sample_geometry(model, config.model.arch)
    return InferenceModel(
        model=encoder,
        preprocess=EvalPreprocess(geometry.image_size),
        tokenizer=geometry.tokenizer(),
        topology=topology,
        info=info,
    )
