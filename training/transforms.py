"""Joint augmentation of an image and its edge map, and the reduction of the edge map to one
score per patch of the model's grid (CLIP-PGS's edge input, computed before the step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from pipelines.edges import dequantize_edges

if TYPE_CHECKING:
    import torch  # imported where used: the data stage's actors never load it for this module

# OpenAI CLIP's normalisation (open_clip's OPENAI_DATASET_MEAN / STD).
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class CropBox:
    """A crop (top, left, height, width) of the stored image, resized to the model input."""

    top: int
    left: int
    height: int
    width: int


def sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> CropBox:
    """torchvision's RandomResizedCrop box rule, drawn from `rng` (10 tries, then centre)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w)
    side = min(height, width)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)


def apply_crop(image: np.ndarray, box: CropBox, size: int, interpolation: int) -> np.ndarray:
    crop = image[box.top : box.top + box.height, box.left : box.left + box.width]
    return cv2.resize(crop, (size, size), interpolation=interpolation)


def transform_edges(edge_u8: np.ndarray, box: CropBox, size: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """The stored edge map (any resolution, e.g. pooled cells) under the image's
    crop-and-resize, sampled bilinearly at each output pixel's centre, in gradient units of
    the *transformed* image: resizing by a factor z scales every gradient by 1/z."""
    scale_y = edge_u8.shape[0] / image_shape[0]
    scale_x = edge_u8.shape[1] / image_shape[1]
    step_x, step_y = box.width / size, box.height / size  # image pixels per output pixel
    # Output pixel u has its centre at image x = left + (u + 1/2) step_x, which is edge-map
    # coordinate x * scale_x - 1/2 (pixel centres at integers): cv2.resize's convention.
    affine = np.array(
        [
            [step_x * scale_x, 0.0, (box.left + step_x / 2) * scale_x - 0.5],
            [0.0, step_y * scale_y, (box.top + step_y / 2) * scale_y - 0.5],
        ]
    )
    edges = cv2.warpAffine(
        dequantize_edges(edge_u8),
        affine,
        (size, size),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    zoom = math.sqrt((size / box.width) * (size / box.height))
    return edges / zoom


def reduce_edges_per_patch(edges: np.ndarray, patch_size: int) -> np.ndarray:
    """Mean edge magnitude of each patch, raster order: (H, W) -> (H/p * W/p,)."""
    grid_h = edges.shape[0] // patch_size
    grid_w = edges.shape[1] // patch_size
    blocks = edges[: grid_h * patch_size, : grid_w * patch_size].reshape(grid_h, patch_size, grid_w, patch_size)
    return blocks.mean(axis=(1, 3)).reshape(-1).astype(np.float32)


def normalize_image(rgb_u8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 with CLIP's mean and std."""
    return ((rgb_u8.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


def normalize_image_tensor(images_u8: "torch.Tensor") -> "torch.Tensor":
    """(B, 3, H, W) uint8 on any device -> float32 with CLIP's mean and std."""
    import torch

    mean = torch.as_tensor(CLIP_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.as_tensor(CLIP_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255.0 - mean) / std


def decode_rgb(jpeg_bytes: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("image does not decode")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def center_box(height: int, width: int) -> CropBox:
    """The evaluation view: the largest centred square."""
    side = min(height, width)
    return CropBox((height - side) // 2, (width - side) // 2, side, side)
