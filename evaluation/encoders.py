"""Batch encoders around a checkpoint's model: plain callable classes (model loaded once in
`__init__`) that the evaluation job runs as Ray Data actors and tests call directly."""

from __future__ import annotations

import numpy as np
import torch

import hashlib

from evaluation.cache import EmbeddingCache
from scoring.sets.files import ImageRef, read_image
from evaluation.inversion import InversionConfig, check_inversion, oti_features, ovi_features
from evaluation.probe_views import ViewAugmenter, ViewConfig
from training.inference import load_inference_model

INDEX = "index"
URI = "uri"
DATA = "data"
TEXT = "text"
EMBEDDING = "embedding"


def image_rows(refs: list[ImageRef]) -> list[dict]:
    """One row per image: its URI, or its bytes when it has no file of its own (uniform column types)."""
    return [
        {INDEX: i, URI: ref if isinstance(ref, str) else "", DATA: ref if isinstance(ref, bytes) else b""}
        for i, ref in enumerate(refs)
    ]


def text_rows(texts: list[str]) -> list[dict]:
    return [{INDEX: i, TEXT: t} for i, t in enumerate(texts)]


IMAGE_OUTPUTS = ("embedding", "class_states", "oti")


def image_identity(uri, data) -> str:
    """A query's identity for its inversion seed: the URI, or the digest of its bytes."""
    return str(uri) if len(uri) else hashlib.sha256(bytes(data)).hexdigest()


def build_inversion(bundle, inversion: dict | None) -> InversionConfig | None:
    if inversion is None:
        return None
    config = InversionConfig(**inversion)
    if bundle.info.get("scorer", "plain") != "plain":
        raise ValueError("modality inversion inverts the plain embeddings: use the plain scorer")
    check_inversion(config, bundle.topology.kind, bundle.model.tower.visual)
    return config


class ImageEncoder:
    """Rows {index, uri, data} -> {index, embedding}: the checkpoint topology's image embeddings;
    with output="class_states" the concatenated class-token states before the projection; with
    output="oti" (and `inversion` settings) each image's OTI feature; with `views` settings the
    features of V augmented views of each image, concatenated (N, V·D) (linear-probe training)."""

    def __init__(
        self,
        checkpoint_uri: str,
        device: str = "cpu",
        scorer: str = "plain",
        output: str = "embedding",
        inversion: dict | None = None,
        views: dict | None = None,
        cache_dir: str | None = None,
    ):
        if output not in IMAGE_OUTPUTS:
            raise ValueError(f"unknown image output {output!r}; known: {IMAGE_OUTPUTS}")
        self.bundle = load_inference_model(checkpoint_uri, device, scorer, cache_dir)
        self.device = device
        model = self.bundle.model
        self.forward = model.encode_image_states if output == "class_states" else model.encode_image
        self.inversion = build_inversion(self.bundle, inversion if output == "oti" else None)
        self.views = None if views is None else ViewAugmenter(ViewConfig(**views), self.bundle.preprocess.image_size)

    def pixels(self, batch: dict) -> torch.Tensor:
        images = [bytes(data) if len(data) else read_image(str(uri)) for uri, data in zip(batch[URI], batch[DATA])]
        return torch.stack([self.bundle.preprocess(image) for image in images])

    def view_features(self, batch: dict) -> torch.Tensor:
        images = [bytes(data) if len(data) else read_image(str(uri)) for uri, data in zip(batch[URI], batch[DATA])]
        identities = [image_identity(uri, data) for uri, data in zip(batch[URI], batch[DATA])]
        per_view = [
            self.forward(
                torch.stack([self.views(image, identity, v) for image, identity in zip(images, identities)]).to(
                    self.device
                )
            )
            for v in range(self.views.config.views)
        ]
        return torch.cat(per_view, dim=1)  # (B, V·D), view-major within a row

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        if self.views is not None:
            return {INDEX: batch[INDEX], EMBEDDING: self.view_features(batch).float().cpu().numpy()}
        features = self.forward(self.pixels(batch).to(self.device))
        if self.inversion is not None:
            identities = [image_identity(uri, data) for uri, data in zip(batch[URI], batch[DATA])]
            features = oti_features(
                self.bundle.model.tower, self.bundle.tokenizer, features, identities, self.inversion
            )
        return {INDEX: batch[INDEX], EMBEDDING: features.float().cpu().numpy()}


class TextEncoder:
    """Rows {index, text} -> {index, embedding}: the checkpoint topology's text embeddings, or
    with `inversion` settings (kind "ovi") each text's OVI feature."""

    def __init__(
        self,
        checkpoint_uri: str,
        device: str = "cpu",
        scorer: str = "plain",
        inversion: dict | None = None,
        cache_dir: str | None = None,
    ):
        self.bundle = load_inference_model(checkpoint_uri, device, scorer, cache_dir)
        self.device = device
        self.inversion = build_inversion(self.bundle, inversion)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        texts = [str(t) for t in batch[TEXT]]
        features = self.bundle.model.encode_text(self.bundle.tokenizer(texts).to(self.device))
        if self.inversion is not None:
            features = ovi_features(self.bundle.model.tower, features, texts, self.inversion)
        return {INDEX: batch[INDEX], EMBEDDING: features.float().cpu().numpy()}


def block_rows(blocks: list[list], is_image: bool) -> list[dict]:
    """One row per cache block: its position and its inputs (image URIs or bytes, or texts)."""
    if not is_image:
        return [{INDEX: i, TEXT: [str(t) for t in values]} for i, values in enumerate(blocks)]
    return [
        {INDEX: i, URI: [r[URI] for r in rows], DATA: [r[DATA] for r in rows]}
        for i, rows in enumerate(image_rows(values) for values in blocks)
    ]


def block_values(batch: dict, b: int, is_image: bool) -> list:
    """The inputs of block row `b` exactly as the driver keyed them (image_rows inverted)."""
    if not is_image:
        return [str(t) for t in batch[TEXT][b]]
    return [str(uri) if len(uri) else bytes(data) for uri, data in zip(batch[URI][b], batch[DATA][b])]


class BlockEncoder:
    """Block rows -> {index, embedding (1, n, D)}: each block encoded in batches of
    `batch_size` by an ImageEncoder or TextEncoder, and published to the embedding cache by
    this actor as soon as it is done (evaluation/cache.py: a killed pass loses at most the
    block in progress here)."""

    def __init__(
        self,
        encoder: type,
        constructor: tuple,
        is_image: bool,
        modality: str,
        batch_size: int,
        cache_root: str | None,
        fingerprint: str,
        checkpoint_cache: str | None = None,
    ):
        self.encoder = encoder(*constructor, cache_dir=checkpoint_cache)
        self.is_image = is_image
        self.modality = modality
        self.batch_size = batch_size
        self.cache = EmbeddingCache(cache_root, fingerprint)

    def encode(self, values: list) -> np.ndarray:
        rows = image_rows(values) if self.is_image else text_rows(values)
        parts = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            columns = {
                key: np.array([r[key] for r in chunk], dtype=object if key != INDEX else np.int64) for key in chunk[0]
            }
            parts.append(self.encoder(columns)[EMBEDDING])
        return np.concatenate(parts).astype(np.float32)

    def __call__(self, batch: dict) -> dict:
        out = []
        for b in range(len(batch[INDEX])):
            values = block_values(batch, b, self.is_image)
            self.cache.claim(self.modality, values)
            features = self.encode(values)
            self.cache.save(self.modality, values, features)
            out.append(features)
        return {INDEX: batch[INDEX], EMBEDDING: np.stack(out)}
