"""Helpers shared by the evaluation tests: a micro checkpoint and benchmark sets in their real
layouts whose images carry their class as a colour (so a probe has something to learn)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from training import checkpoint
from training.config import apply_overrides, temperature_of
from training.methods.recipes import build_method_config
from training.model import build_model
from training.optim import build_optimizer, build_scheduler

ARCH = "clip-micro-p8-32"
CLASSNAMES = ["red thing", "green thing", "blue thing", "yellow thing", "cyan thing", "magenta thing"]
BASE_COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (230, 220, 30), (30, 220, 220), (220, 30, 220)]
TEMPLATES = ["a photo of a {c}.", "a {c}.", "art of the {c}"]


def save_micro_checkpoint(directory: Path, seed: int = 5, **overrides) -> Path:
    config = apply_overrides(build_method_config("flip"), {"model.arch": ARCH, "run.seed": seed, **overrides})
    torch.manual_seed(seed)
    model = build_model(
        config.model, config.masking, temperature_of(config.loss, config.topology), topology=config.topology
    )
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=2)
    return checkpoint.save_checkpoint(
        directory, model, optimizer, scheduler, 1, config, {"manifest_digest": "feed", "code_version": "test"}
    )


def class_image(label: int, index: int, image_format: str = "PNG", noise: float = 25.0) -> bytes:
    """A 32x32 image of the class colour with per-image noise."""
    rng = np.random.default_rng([label, index])
    pixels = np.clip(np.array(BASE_COLOURS[label]) + rng.normal(0, noise, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=image_format)
    return buf.getvalue()


def write_class_folder(root: Path, n_per_class: int, offset: int = 0, n_classes: int = len(CLASSNAMES)) -> Path:
    for label in range(n_classes):
        for i in range(n_per_class):
            path = root / f"{label:03d}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(class_image(label, i + offset))
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES[:n_classes]) + "\n")
    (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def write_karpathy(root: Path, n_images: int) -> Path:
    """A Karpathy-layout retrieval set: image i has class colour i % 6 and 3 captions about it,
    no two alike: identical captions of two images would tie exactly, and which one ranks
    first would then depend on the last bits of a batched matmul (it differs between CPUs)."""
    entries = []
    for i in range(n_images):
        name = CLASSNAMES[i % len(CLASSNAMES)]
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"{i}.png").write_bytes(class_image(i % len(CLASSNAMES), 100 + i))
        entries.append(
            {
                "filename": f"{i}.png",
                "filepath": "images",
                "split": "test",
                "sentences": [
                    {"raw": f"a {name} number {i}"},
                    {"raw": f"picture {i} of a {name}"},
                    {"raw": f"the {name} in image {i}"},
                ],
            }
        )
    path = root / "dataset_tiny.json"
    path.write_text(json.dumps({"images": entries}))
    return path
