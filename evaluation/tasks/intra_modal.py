"""Intra-modal retrieval and the modality gap, as in "Cross the Gap" (METHODS.md §4.4-4.5):
image->image mAP with test-split queries against a train-split gallery (relevant = same
class), text->text mAP on a captioning set (each image's first caption queries the others;
relevant = same image), and ‖mean image feature − mean text feature‖ over paired samples.

The query features are whatever the benchmark requested: the native features (the intra-modal
baseline) or the modality-inverted ones (OTI images, OVI captions, evaluation/inversion.py),
which the encoder actors compute; a suite entry names them in its options
(`"options": {"query": "oti"}`)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from training.topology import Sphere

MAP_KEY = "mAP"
GAP_KEY = "modality_gap"
QUERY_BLOCK_SIZE = 256  # queries ranked at once, bounds the (block, gallery) temporaries

Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def compute_average_precisions(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) AP over the full ranked gallery: mean of precision@rank at each relevant item's rank
    (torchmetrics' retrieval_average_precision); a query with no relevant item scores 0."""
    order = np.argsort(-scores, axis=1, kind="stable")
    truth = np.take_along_axis(relevant, order, axis=1).astype(np.float64)  # (Q, M) in rank order
    precision = np.cumsum(truth, axis=1) / np.arange(1, scores.shape[1] + 1)[None, :]
    return (precision * truth).sum(axis=1) / np.maximum(truth.sum(axis=1), 1)


def compute_retrieval_map(queries: np.ndarray, query_owner: np.ndarray, gallery: np.ndarray,
                          gallery_owner: np.ndarray, similarity: Similarity,
                          block_size: int = QUERY_BLOCK_SIZE) -> float:
    """mAP of ranking `gallery` for each query; gallery item j is relevant to query q when
    their owners (class label, source image) are equal."""
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError("intra-modal retrieval needs queries and a gallery")
    precisions = []
    for start in range(0, len(queries), block_size):
        scores = np.asarray(similarity(queries[start:start + block_size], gallery), np.float64)
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")
        relevant = query_owner[start:start + block_size, None] == gallery_owner[None, :]
        precisions.append(compute_average_precisions(scores, relevant))
    return float(np.mean(np.concatenate(precisions)))


def split_first_caption(text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query caption indices, gallery caption indices): each image's first caption is its query."""
    _, first = np.unique(text_to_image, return_index=True)
    gallery = np.setdiff1d(np.arange(len(text_to_image)), first)
    return first, gallery


def compute_text_to_text_map(text_features: np.ndarray, text_to_image: np.ndarray, similarity: Similarity,
                             query_features: np.ndarray | None = None) -> float:
    """Each image's first caption queries the other captions; `query_features` (one row per
    image, in image order) replaces those captions' own features as queries (e.g. OVI)."""
    queries, gallery = split_first_caption(text_to_image)
    query_rows = text_features[queries] if query_features is None else query_features
    return compute_retrieval_map(query_rows, text_to_image[queries], text_features[gallery],
                                 text_to_image[gallery], similarity)


def compute_modality_gap(image_features: np.ndarray, text_features: np.ndarray,
                         text_to_image: np.ndarray, topology: Sphere | None = None) -> float:
    """The topology's gap over the n (image, caption) pairs (`Sphere.modality_gap`): on the
    sphere ‖(1/n) Σ x̂_i − (1/n) Σ ŷ_i‖ of L2-normalised features; on m chunks that distance
    of the chunk-normalised rows divided by √m (the root mean square of the m spheres' gaps);
    on the Euclidean topology the distance of the raw means."""
    return (topology or Sphere(1)).modality_gap(image_features[text_to_image], text_features)
