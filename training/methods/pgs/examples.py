"""Example inputs for looking at CLIP-PGS's selection: scikit-image's sample photographs (or any
RGB array, such as a demo-corpus scene that the caller renders), each prepared as the training
pipeline prepares a sample (JPEG, Sobel edge map as stored in the shards, centre crop,
per-patch edge scores)."""

from __future__ import annotations

import cv2
import numpy as np

from pipelines.edges import compute_edge_png, decode_edge_png
from training import transforms

SKIMAGE_SAMPLES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "immunohistochemistry",
    "horse",
    "page",
    "moon",
    "brick",
    "grass",
)


def load_skimage_sample(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one of scikit-image's bundled images."""
    from skimage import data

    image = np.asarray(getattr(data, name)())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def prepare_view(rgb: np.ndarray, image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation-style view of a sample as a training batch carries it: (3, S, S) uint8
    and (L,) per-patch Sobel scores computed from the stored edge map."""
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    if not ok:
        raise ValueError("image does not encode")
    decoded = transforms.decode_rgb(jpeg.tobytes())
    box = transforms.center_box(*decoded.shape[:2])
    image = transforms.apply_crop(decoded, box, image_size, cv2.INTER_CUBIC)
    edges = transforms.transform_edges(
        decode_edge_png(compute_edge_png(jpeg.tobytes())), box, image_size, decoded.shape
    )
    return image.transpose(2, 0, 1), transforms.reduce_edges_per_patch(edges, patch_size)


def prepare_batch(rgbs: list[np.ndarray], image_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3, S, S) uint8 images and (B, L) edge scores."""
    views = [prepare_view(rgb, image_size, patch_size) for rgb in rgbs]
    return np.stack([v[0] for v in views]), np.stack([v[1] for v in views])
