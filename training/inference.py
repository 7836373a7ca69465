"""Rebuilding a trained model for evaluation from its checkpoint alone (config inside)."""
from __future__ import annotations

import cv2
import torch

from training import checkpoint, transforms
from training.model import build_model, tower_geometry
from training.towers import build_tokenizer

SIMILARITIES = {"sphere": lambda image, text: image @ text.T}  # cosine of unit features


class EvalPreprocess:
    """Encoded image bytes -> (3, H, W) tensor: centred square crop, resize, CLIP norm."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, image_bytes: bytes) -> torch.Tensor:
        rgb = transforms.decode_rgb(image_bytes)
        box = transforms.center_box(*rgb.shape[:2])
        crop = transforms.apply_crop(rgb, box, self.image_size, cv2.INTER_AREA)
        return torch.from_numpy(transforms.normalize_image(crop))


def load_inference_model(uri: str, device: str = "cpu") -> checkpoint.InferenceModel:
    directory = checkpoint.fetch_checkpoint(uri)
    config = checkpoint.load_config(directory)
    model = build_model(config.model, config.masking, config.loss)
    model.tower.load_state_dict(checkpoint.tower_state_dict(directory))
    model.eval().to(device)
    state = checkpoint.read_state(directory)
    info = {"path": uri, "resolved": str(directory), "step": state["step"],
            "method": config.method, "arch": config.model.arch, "topology": "sphere",
            "manifest_digests": [state.get("manifest_digest")], "data": state.get("data_uri"),
            "code_version": state.get("code_version")}
    return checkpoint.InferenceModel(model=model.tower, preprocess=EvalPreprocess(tower_geometry(model)[0]),
                                     tokenizer=build_tokenizer(config.model.arch),
                                     similarity=SIMILARITIES["sphere"], info=info)
