"""Augmented training views for a linear probe (the topology paper's MoCo v3 protocol, docs/methods/topology.md
§6): RandomResizedCrop(scale 0.75-1) and timm's RandAugment "rand-m9-mstd0.5-inc1" (the paper
calls it AutoAugment; the string is RandAugment). A frozen tower's features of V such views of
every training image are encoded once; the probe's epoch e reads view e mod V (V = epochs gives
every epoch fresh augmentation, as when augmenting on the fly). Each view is drawn from (seed,
image identity, view index) alone, so the features do not depend on how images are batched.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform

from evaluation.cache import settings_key
from training import transforms

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"
CLIP_MEAN_PIXEL = (122, 116, 104)  # RandAugment's fill colour: CLIP's mean, as uint8


@dataclass(frozen=True)
class ViewConfig:
    views: int = 100  # augmented copies of each training image (one per probe epoch, cycled)
    scale: tuple[float, float] = (0.75, 1.0)
    rand_augment: str = RAND_AUGMENT
    seed: int = 0


def view_seed(seed: int, identity: str, view: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{identity}\0{view}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ViewAugmenter:
    """Encoded image bytes, identity, view index -> (3, S, S) CLIP-normalised float tensor."""

    def __init__(self, config: ViewConfig, image_size: int):
        if config.views < 1:
            raise ValueError(f"linear-probe views must be >= 1, got {config.views}")
        self.config = config
        self.image_size = image_size
        self.rand_augment = rand_augment_transform(config.rand_augment, {"img_mean": CLIP_MEAN_PIXEL})

    def __call__(self, image_bytes: bytes, identity: str, view: int) -> torch.Tensor:
        seed = view_seed(self.config.seed, identity, view)
        rgb = transforms.decode_rgb(image_bytes)
        box = transforms.sample_crop(np.random.default_rng(seed), *rgb.shape[:2], scale=tuple(self.config.scale))
        crop = transforms.apply_crop(rgb, box, self.image_size, cv2.INTER_AREA)
        # timm picks the operations with NumPy's global generator and draws their magnitudes from
        # the `random` module: both seeded for this view, both restored after.
        state = random.getstate()
        np_state = np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            augmented = np.asarray(self.rand_augment(Image.fromarray(crop)))
        finally:
            random.setstate(state)
            np.random.set_state(np_state)
        return torch.from_numpy(transforms.normalize_image(np.ascontiguousarray(augmented)))


_REQUESTS: dict[str, ViewConfig] = {}


def views_request(config: ViewConfig) -> str:
    """The embedding request "image_views-<digest>" of class-token states of V views per image
    (the cache key changes with every setting)."""
    key = settings_key("image_views", config)
    _REQUESTS[key] = config
    return key


def requested_views(modality: str) -> ViewConfig | None:
    return _REQUESTS.get(modality)


def views_from_options(options: dict) -> ViewConfig | None:
    raw = options.get("views")
    if raw is None:
        return None
    raw = {"views": raw} if isinstance(raw, int) else dict(raw)
    if "scale" in raw:
        raw["scale"] = tuple(raw["scale"])
    return ViewConfig(**raw)
