"""Masking pictures like Figure 4 of the CLIP-PGS paper: for a handful of images, the
original and the patches FLIP and CLIP-PGS (0.5 and 0.3, reference and paper mode) leave
to the vision tower. Dropped patches (removed or hidden) are dimmed to a quarter.

    python scripts/pgs_masks.py --out masks.png [--image-size 224 --patch-size 16]

Images: scikit-image's sample photographs and demo-corpus scenes, prepared as the training
pipeline prepares them (stored Sobel edge map, per-patch edge scores). Selection at epoch 0
(alpha = 0: pixel similarity only, so no trained weights are needed); the reference mode's
keep count is shared by the images of the grid, as it is by a training batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from training.config import PGSConfig  # noqa: E402
from training.methods.flip import compute_num_keep  # noqa: E402
from training.methods.pgs import PGSSelector  # noqa: E402
from pipelines.demo_corpus import render_demo_samples  # noqa: E402
from training.methods.pgs.examples import load_skimage_sample, prepare_batch  # noqa: E402
from training.transforms import normalize_image_tensor  # noqa: E402

COLUMNS = (
    ("original", None),
    ("FLIP 0.5", None),
    ("PGS0.5 ref", PGSConfig(mode="reference", min_mask_ratio=0.5)),
    ("PGS0.3 ref", PGSConfig(mode="reference", min_mask_ratio=0.3)),
    ("PGS0.5 paper", PGSConfig(mode="paper", min_mask_ratio=0.5)),
    ("PGS0.3 paper", PGSConfig(mode="paper", min_mask_ratio=0.3)),
)
HEADER_PX, GAP_PX, DIM = 22, 4, 0.25
DEFAULT_SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "coins")


def compute_grid_size(rows: int, image_size: int) -> tuple[int, int]:
    """(width, height) in pixels of the PNG for `rows` images."""
    cols = len(COLUMNS)
    return cols * image_size + (cols + 1) * GAP_PX, HEADER_PX + rows * image_size + (rows + 1) * GAP_PX


def visible_masks(config: PGSConfig | None, images, edges, patch_size: int, seed: int) -> np.ndarray:
    """(B, L) bool: patches the tower sees (FLIP when config is None)."""
    batch, num_patches = edges.shape
    generator = torch.Generator().manual_seed(seed)
    visible = torch.zeros(batch, num_patches, dtype=torch.bool)
    if config is None:
        order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
        keep = order[:, : compute_num_keep(num_patches, 0.5)]
        return visible.scatter_(1, keep, True).numpy()
    selector = PGSSelector(config, patch_size).train()
    selector.generator = generator
    selection = selector(torch.zeros(batch, num_patches, 1), images, edges, 0.0)
    shown = torch.ones_like(selection.keep_index, dtype=torch.bool)
    if selection.hidden is not None:
        shown = ~selection.hidden
    return visible.scatter_(1, selection.keep_index, shown).numpy()


def paint_dropped(image_hwc: np.ndarray, visible: np.ndarray, patch_size: int) -> np.ndarray:
    grid = image_hwc.shape[0] // patch_size
    tile = image_hwc.copy()
    for index in np.flatnonzero(~visible):
        r, c = divmod(int(index), grid)
        block = tile[r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
        block[...] = (block * DIM).astype(np.uint8)
    return tile


def write_mask_grid(out: Path, rgbs: list[np.ndarray], image_size: int, patch_size: int, seed: int) -> tuple[int, int]:
    images_u8, edge_np = prepare_batch(rgbs, image_size, patch_size)
    images, edges = normalize_image_tensor(torch.from_numpy(images_u8)), torch.from_numpy(edge_np)
    width, height = compute_grid_size(len(rgbs), image_size)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, (title, config) in enumerate(COLUMNS):
        x = GAP_PX + col * (image_size + GAP_PX)
        draw.text((x + 4, 5), title, fill="black")
        visible = None if col == 0 else visible_masks(config, images, edges, patch_size, seed)
        for row in range(len(rgbs)):
            tile = images_u8[row].transpose(1, 2, 0)
            if visible is not None:
                tile = paint_dropped(tile, visible[row], patch_size)
            y = HEADER_PX + GAP_PX + row * (image_size + GAP_PX)
            canvas.paste(Image.fromarray(tile), (x, y))
            if visible is not None:
                draw.text((x + 3, y + 2), f"{100 * (1 - visible[row].mean()):.0f}% dropped", fill="yellow")
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return width, height


def main(argv=None) -> tuple[int, int]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="masks.png")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--skimage", nargs="*", default=list(DEFAULT_SKIMAGE), help="scikit-image sample names")
    p.add_argument("--demo", type=int, default=3, help="demo-corpus scenes")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rgbs = [load_skimage_sample(n) for n in args.skimage] + render_demo_samples(args.demo, seed=args.seed)
    if not rgbs:
        raise SystemExit("no images: give --skimage names or --demo > 0")
    size = write_mask_grid(Path(args.out), rgbs, args.image_size, args.patch_size, args.seed)
    print(f"wrote {args.out}: {len(rgbs)} images x {len(COLUMNS)} columns, {size[0]}x{size[1]} px")
    return size


if __name__ == "__main__":
    main()
