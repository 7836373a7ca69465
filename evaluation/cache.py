"""Embeddings cached per checkpoint and dataset, so a re-run only encodes what changed.

An entry's key digests the checkpoint's weights (the sha256 state.json records), the
preprocessing (image size, tokenizer), the modality and the exact values embedded (image
URIs or bytes, texts). Entries are `.npy` files published atomically (pipelines.storage),
locally or on s3://."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import socket

import numpy as np

from pipelines import storage

CLAIM_SUFFIX = ".claim"


def digest_values(values: list) -> str:
    """sha256 over a list of strings and/or bytes, each length-prefixed (no ambiguity)."""
    h = hashlib.sha256()
    for value in values:
        data = value if isinstance(value, bytes) else b"s" + str(value).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def settings_key(prefix: str, settings) -> str:
    """`<prefix>-<digest>` of a settings dataclass: the modality key of an embedding request
    (inverted or augmented features) that changes with every setting."""
    encoded = json.dumps(dataclasses.asdict(settings), sort_keys=True).encode("utf-8")
    return f"{prefix}-{hashlib.sha256(encoded).hexdigest()[:16]}"


def model_fingerprint(weights_sha256: str, preprocessing: dict) -> str:
    """What, besides the inputs, decides an embedding: the weights and the preprocessing."""
    return hashlib.sha256(
        json.dumps({"weights": weights_sha256, **preprocessing}, sort_keys=True).encode("utf-8")
    ).hexdigest()


class EmbeddingCache:
    """`<root>/<model fingerprint[:16]>/<modality>-<values digest>.npy`; root None disables it.

    The evaluation job caches per block of inputs (`--cache-block` values), written by the
    encoder actor that computed it as soon as it has, so a killed pass loses only the blocks
    in progress: at most one per actor. An actor first leaves a `.claim` beside the entry it is
    computing and removes it once the entry is published; claims left behind are the blocks
    that were in progress when a pass died (`stale_claims`)."""

    def __init__(self, root: str | None, fingerprint: str):
        self.root = root
        self.fingerprint = fingerprint
        self.enabled = root is not None
        if self.enabled:
            self.fs, base = storage.open_storage(root)
            self.folder = storage.join(base, fingerprint[:16])
        self.hits = self.misses = 0

    def path(self, modality: str, values: list) -> str:
        return storage.join(self.folder, f"{modality}-{digest_values(values)}.npy")

    def load(self, modality: str, values: list) -> np.ndarray | None:
        if not self.enabled or not self.fs.exists(self.path(modality, values)):
            self.misses += 1
            return None
        array = np.load(io.BytesIO(storage.read_bytes(self.fs, self.path(modality, values))))
        if len(array) != len(values):  # a foreign or damaged file: recompute
            self.misses += 1
            return None
        self.hits += 1
        return array

    def save(self, modality: str, values: list, array: np.ndarray) -> None:
        if self.enabled:
            buf = io.BytesIO()
            np.save(buf, np.asarray(array, np.float32))
            storage.write_bytes_atomic(self.fs, self.path(modality, values), buf.getvalue())
            claim = self.path(modality, values) + CLAIM_SUFFIX
            if self.fs.exists(claim):
                self.fs.rm(claim)

    def claim(self, modality: str, values: list) -> None:
        """Mark the entry as being computed (by this process)."""
        if self.enabled:
            note = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "n_values": len(values)})
            storage.write_bytes_atomic(self.fs, self.path(modality, values) + CLAIM_SUFFIX, note.encode())

    def stale_claims(self) -> list[str]:
        """Entries claimed and never published (their pass died while computing them)."""
        if not self.enabled or not self.fs.exists(self.folder):
            return []
        return sorted(p for p in self.fs.ls(self.folder, detail=False) if p.endswith(CLAIM_SUFFIX))
