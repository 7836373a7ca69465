"""scripts/pgs_masks.py writes a valid PNG grid of the expected size, and its panels show
what each selector keeps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from scripts import pgs_masks

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


def test_command_writes_a_png_grid_of_the_expected_size(tmp_path):
    out = tmp_path / "figures" / "masks.png"
    size = pgs_masks.main(
        ["--out", str(out), "--image-size", "64", "--patch-size", "8", "--skimage", "astronaut", "coins", "--demo", "2"]
    )
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        assert image.size == size == pgs_masks.compute_grid_size(4, 64)
        pixels = np.asarray(image)
    assert size == (6 * 64 + 7 * pgs_masks.GAP_PX, pgs_masks.HEADER_PX + 4 * 64 + 5 * pgs_masks.GAP_PX)
    # Row 0, FLIP panel: every patch below the label (rows 0-1) is the original or the original
    # dimmed, and half of all 64 patches are dimmed.
    y0, x_flip = pgs_masks.HEADER_PX + pgs_masks.GAP_PX, 2 * pgs_masks.GAP_PX + 64
    original = pixels[y0 : y0 + 64, pgs_masks.GAP_PX : pgs_masks.GAP_PX + 64]
    flip = pixels[y0 : y0 + 64, x_flip : x_flip + 64]
    dimmed = 0
    for r in range(2, 8):
        for c in range(8):
            block, orig = (a[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] for a in (flip, original))
            same, dim = np.array_equal(block, orig), np.array_equal(block, (orig * pgs_masks.DIM).astype(np.uint8))
            assert same or dim
            dimmed += dim and not same
    assert 32 - 16 <= dimmed <= 32


def test_command_needs_images(tmp_path):
    with pytest.raises(SystemExit):
        pgs_masks.main(["--out", str(tmp_path / "x.png"), "--skimage", "--demo", "0"])
