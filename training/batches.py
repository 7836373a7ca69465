"""CPU-side batch preparation before the step: decode, joint crop of image and edge map,
per-patch edge scores, one caption per image sampled from its group, tokenisation.

`BatchPreprocessor` (tokenizer built once in `__init__`) prepares a list of shard rows into one
batch; the data stage (`data_stage.PrepareShardItems`, on Ray Data CPU actors) runs it on each
shard's rows, and tests call it directly.
"""

from __future__ import annotations

import json

import cv2
import numpy as np

from pipelines import shards
from pipelines.edges import decode_edge_png
from training import transforms
from training.config import DataConfig
from training.towers import SampleGeometry, build_tokenizer

IMAGES = "images"
TEXTS = "texts"
EDGE_SCORES = "edge_scores"
KEYS = "keys"
SHORT_TEXTS = "short_texts"  # a second, short caption per image (policy "long_and_short")
EPOCH = "epoch"  # column added by the reader: randomness is a function of (seed, epoch, key)
CAPTION_POLICIES = ("uniform", "short", "long", "mix", "long_and_short")


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample randomness independent of batching, worker count and resume point."""
    return np.random.default_rng([seed, epoch, int(key[:15], 16)])


def choose_caption(captions: list[dict], policy: str, rng: np.random.Generator, long_fraction: float = 0.5) -> str:
    """One caption of the group: uniform over all, restricted to one kind when present, or
    ("mix") the long kind with probability `long_fraction`, else the short kind."""
    if policy not in CAPTION_POLICIES or policy == "long_and_short":
        raise ValueError(f"unknown single-caption policy {policy!r}; known: {CAPTION_POLICIES[:4]}")
    if policy == "mix":
        policy = shards.CAPTION_LONG if rng.random() < long_fraction else shards.CAPTION_SHORT
    pool = [c for c in captions if policy == "uniform" or c["kind"] == policy] or captions
    return pool[int(rng.integers(len(pool)))]["text"]


def choose_captions(
    captions: list[dict], policy: str, rng: np.random.Generator, long_fraction: float
) -> tuple[str, ...]:
    """The caption(s) of one image for one step: one, or (long, short) for "long_and_short"."""
    if policy == "long_and_short":
        return (choose_caption(captions, shards.CAPTION_LONG, rng), choose_caption(captions, shards.CAPTION_SHORT, rng))
    return (choose_caption(captions, policy, rng, long_fraction),)


class BatchPreprocessor:
    """Shard rows (dict of arrays) -> a prepared batch (dict of arrays)."""

    def __init__(
        self,
        arch: str,
        image_size: int,
        patch_size: int,
        crop_scale,
        seed: int,
        caption_policy: str = "uniform",
        long_fraction: float = 0.5,
        context_length: int | None = None,
    ):
        if caption_policy not in CAPTION_POLICIES:
            raise ValueError(f"unknown caption policy {caption_policy!r}; known: {CAPTION_POLICIES}")
        self.tokenizer = build_tokenizer(arch, context_length)
        self.image_size = image_size
        self.patch_size = patch_size
        self.crop_scale = tuple(crop_scale)
        self.seed = seed
        self.caption_policy = caption_policy
        self.long_fraction = long_fraction
        cv2.setNumThreads(1)

    @classmethod
    def for_run(cls, geometry: SampleGeometry, data: DataConfig, seed: int) -> BatchPreprocessor:
        """The preprocessor of a run: the data section's crop and caption policy, for the
        geometry read from the run's towers."""
        return cls(
            geometry.arch,
            geometry.image_size,
            geometry.patch_size,
            data.crop_scale,
            seed,
            data.caption_policy,
            data.long_caption_fraction,
            context_length=geometry.context_length,
        )

    def prepare_sample(self, row: dict, epoch: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        rng = sample_rng(self.seed, epoch, row[shards.KEY])
        rgb = transforms.decode_rgb(row[shards.IMAGE])
        box = transforms.sample_crop(rng, rgb.shape[0], rgb.shape[1], self.crop_scale)
        image = transforms.apply_crop(rgb, box, self.image_size, cv2.INTER_CUBIC)
        edges = transforms.transform_edges(decode_edge_png(row[shards.EDGE]), box, self.image_size, rgb.shape)
        scores = transforms.reduce_edges_per_patch(edges, self.patch_size)
        captions = choose_captions(
            json.loads(row[shards.META])["captions"], self.caption_policy, rng, self.long_fraction
        )
        return image.transpose(2, 0, 1), scores, captions  # uint8 (3, H, W): 4x less to move

    def prepare_rows(self, rows: list[dict]) -> dict:
        """Sample rows (each with its epoch) -> one prepared batch."""
        prepared = [self.prepare_sample(r, int(r[EPOCH])) for r in rows]
        batch = {
            IMAGES: np.stack([p[0] for p in prepared]),  # (B, 3, H, W) uint8, normalised on device
            EDGE_SCORES: np.stack([p[1] for p in prepared]),  # (B, L) float32
            TEXTS: self.tokenizer([p[2][0] for p in prepared]).numpy(),  # (B, context) int64
            KEYS: np.asarray([r[shards.KEY] for r in rows], dtype=object),
        }
        if self.caption_policy == "long_and_short":
            batch[SHORT_TEXTS] = self.tokenizer([p[2][1] for p in prepared]).numpy()  # (B, context)
        return batch
