"""Sobel edge maps, stored 8-bit and lossless beside each image (CLIP-PGS's edge input).

The Sobel gradient magnitude is computed on the stored image at full resolution, then
averaged over EDGE_CELL x EDGE_CELL pixel cells (a (H//4, W//4) map: per-patch scores only
need cell means, and a full-resolution map would cost more bytes than the JPEG itself).
The stored value is that mean scaled by 255 / EDGE_FULL_SCALE and clipped, so one unit
means the same gradient in every image.
"""

from __future__ import annotations

import cv2
import numpy as np

SOBEL_KSIZE = 3
# A 3x3 Sobel of a unit-per-pixel ramp gives 8; 1020 = 8 * 127.5 covers a step of
# half the 8-bit range per pixel, so only the hardest black/white edges clip.
EDGE_FULL_SCALE = 1020.0
EDGE_CELL = 4  # image pixels per edge-map cell, along each axis


def compute_sobel_magnitude_reflected(grey: np.ndarray) -> np.ndarray:
    """Float32 gradient magnitude of a (H, W) uint8/float image (reflected borders)."""
    img = grey.astype(np.float32)
    gx = cv2.Sobel(img, cv2.CV_32F, 1, 0, ksize=SOBEL_KSIZE, borderType=cv2.BORDER_REFLECT_101)
    gy = cv2.Sobel(img, cv2.CV_32F, 0, 1, ksize=SOBEL_KSIZE, borderType=cv2.BORDER_REFLECT_101)
    # Not cv2.magnitude: its SIMD path rounds the last bit differently with buffer alignment,
    # which flips exact .5 quantisation ties between runs. Sobel of 8-bit input is integral,
    # so this sum is exact in float32 and numpy's sqrt is correctly rounded: reproducible.
    return np.sqrt(gx * gx + gy * gy)


def quantize_edges(magnitude: np.ndarray) -> np.ndarray:
    scaled = magnitude * (255.0 / EDGE_FULL_SCALE)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def dequantize_edges(edge_u8: np.ndarray) -> np.ndarray:
    """Back to gradient-magnitude units (float32)."""
    return edge_u8.astype(np.float32) * (EDGE_FULL_SCALE / 255.0)


def edge_map_shape(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the stored edge map of a (height, width) image."""
    return max(1, height // EDGE_CELL), max(1, width // EDGE_CELL)


def pool_edges(magnitude: np.ndarray) -> np.ndarray:
    """Cell means of a full-resolution magnitude map (exact when the sides divide by the cell)."""
    rows, cols = edge_map_shape(*magnitude.shape)
    return cv2.resize(magnitude, (cols, rows), interpolation=cv2.INTER_AREA)


def edge_map_u8(grey: np.ndarray) -> np.ndarray:
    """The stored edge map of a grey image: pooled Sobel magnitude, quantised to 8 bits."""
    return quantize_edges(pool_edges(compute_sobel_magnitude_reflected(grey)))


def compute_edge_png(jpeg_bytes: bytes) -> bytes:
    """Lossless 8-bit edge map (PNG) of an encoded image, of shape edge_map_shape(H, W)."""
    grey = cv2.imdecode(np.frombuffer(jpeg_bytes, np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("image does not decode")
    ok, png = cv2.imencode(".png", edge_map_u8(grey))
    if not ok:
        raise ValueError("edge map does not encode")
    return png.tobytes()


def decode_edge_png(png_bytes: bytes) -> np.ndarray:
    edge = cv2.imdecode(np.frombuffer(png_bytes, np.uint8), cv2.IMREAD_UNCHANGED)
    if edge is None or edge.ndim != 2:
        raise ValueError("edge map is not a single-channel PNG")
    return edge
