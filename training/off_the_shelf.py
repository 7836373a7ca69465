"""An open_clip model as evaluation sees a checkpoint of ours: the `InferenceModel` of an
architecture plus its weights (an open_clip file, local or s3://, or an open_clip pretrained
tag where the network allows), with open_clip's own evaluation preprocessing and tokenizer, so
that its numbers match the published ones. Referred to as `open_clip:<ARCH>=<WEIGHTS>` wherever
a checkpoint URI goes (the evaluation job's `--open-clip ARCH=WEIGHTS`)."""

from __future__ import annotations

import hashlib
import io

import open_clip.transform
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines import storage
from training.inference_model import InferenceModel
from training.model import check_patch_tower
from training.towers import pooled_class_states
from training.pretrained import load_pretrained_tower
from training.methods.topology.spaces import Sphere
from training.towers import build_tokenizer

PREFIX = "open_clip:"


def is_open_clip_ref(uri: str) -> bool:
    return str(uri).startswith(PREFIX)


def parse_open_clip_ref(uri: str) -> tuple[str, str]:
    """ "open_clip:ARCH=WEIGHTS" (or "ARCH=WEIGHTS") -> (arch, weights)."""
    spec = uri[len(PREFIX) :] if is_open_clip_ref(uri) else uri
    arch, mark, weights = spec.partition("=")
    if not mark or not arch or not weights:
        raise ValueError(f"an open_clip model is ARCH=WEIGHTS (an open_clip file or pretrained tag), got {spec!r}")
    return arch, weights


class OpenClipPreprocess:
    """Encoded image bytes -> (3, H, W): open_clip's evaluation transform of the model (its
    resize mode, interpolation, mean and std), on the decoded RGB image."""

    def __init__(self, preprocess_cfg: dict):
        self.config = dict(preprocess_cfg)
        self.image_size = self.config["size"][0] if isinstance(self.config["size"], tuple) else self.config["size"]
        self.transform = open_clip.transform.image_transform_v2(
            open_clip.transform.PreprocessCfg(**self.config), is_train=False
        )

    def __call__(self, image_bytes: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(image_bytes)) as image:
            return self.transform(image.convert("RGB"))


class UnitEncoder(nn.Module):
    """encode_image / encode_text -> L2-normalised features (the sphere's embedding); `tower`
    is the open_clip model itself."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        self.tower = tower

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower.encode_image(images), dim=-1)

    def encode_text(self, texts: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.tower.encode_text(texts), dim=-1)

    def encode_image_states(self, images: torch.Tensor) -> torch.Tensor:
        """The class-token state before the projection (a linear probe's features)."""
        check_patch_tower(self.tower.visual, "class-token features")
        return pooled_class_states(self.tower.visual, images)


def weights_digest(weights: str) -> str:
    """sha256 of a weights file; of the tag's name for an open_clip pretrained tag."""
    fs, path = storage.open_storage(weights)
    if fs.isfile(path):
        return storage.file_sha256(weights)
    return hashlib.sha256(f"open_clip-tag:{weights}".encode()).hexdigest()


def load_open_clip_inference(uri: str, device: str = "cpu", scorer: str = "plain") -> InferenceModel:
    if scorer != "plain":
        raise ValueError(f"scorer {scorer!r} needs a checkpoint of this project; an open_clip model scores by cosine")
    arch, weights = parse_open_clip_ref(uri)
    tower = load_pretrained_tower(arch, weights).eval().to(device)
    topology = Sphere(tower.text_projection.shape[1])
    info = {
        "path": f"{PREFIX}{arch}={weights}",
        "step": None,
        "method": "open_clip",
        "arch": arch,
        "topology": topology.describe(),
        "scorer": scorer,
        "manifest_digests": [],
        "data_weights": [],
        "data_uris": [],
        "weights": weights,
        "weights_sha256": weights_digest(weights),
    }
    return InferenceModel(
        model=UnitEncoder(tower).eval(),
        preprocess=OpenClipPreprocess(tower.visual.preprocess_cfg),
        tokenizer=build_tokenizer(arch),
        topology=topology,
        info=info,
    )
