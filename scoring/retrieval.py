"""Image-text retrieval recall@k as CLIP papers and CLIP_benchmark report it: a query counts as
a hit when at least one of its matching items is among its k best-scoring candidates."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
# CLIP_benchmark names each direction by what is retrieved: "image retrieval" = text -> image.
IMAGE_RETRIEVAL_KEY = "image_retrieval_recall@{k}"
TEXT_RETRIEVAL_KEY = "text_retrieval_recall@{k}"
QUERY_BLOCK_SIZE = 1024  # queries scored at once, bounds the (block, n_candidates) temporaries


def check_retrieval_inputs(scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int]) -> None:
    """Scores (n_images, n_texts) finite, one image index per text, positive ks."""
    if scores.ndim != 2 or text_to_image.shape != (scores.shape[1],) or 0 in scores.shape:
        raise ValueError(
            f"expected scores (n_images, n_texts) and text_to_image (n_texts,), got "
            f"{scores.shape} and {text_to_image.shape}"
        )
    if text_to_image.min() < 0 or text_to_image.max() >= scores.shape[0]:
        raise ValueError(f"text_to_image must lie in [0, {scores.shape[0]})")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf")  # NaN compares False and would read as a hit
    if min(ks) < 1:
        raise ValueError(f"ks must be positive, got {tuple(ks)}")


def compute_best_positive_ranks(
    query_scores: np.ndarray,
    query_owner: np.ndarray,
    candidate_owner: np.ndarray,
    block_size: int = QUERY_BLOCK_SIZE,
) -> np.ndarray:
    """(Q,) 0-based rank of each query's best-scoring positive; inf for a query without one.

    Candidate j is a positive of query q when `candidate_owner[j] == query_owner[q]`. The rank
    counts negatives scoring >= the best positive, so ties go against the query.
    """
    ranks = np.empty(len(query_owner), dtype=np.float64)
    for start in range(0, len(query_owner), block_size):
        block = query_scores[start : start + block_size]  # (B, M)
        positive = candidate_owner[None, :] == query_owner[start : start + block_size, None]  # (B, M)
        best_positive = np.where(positive, block, -np.inf).max(axis=1, keepdims=True)  # (B, 1)
        n_above = np.count_nonzero((block >= best_positive) & ~positive, axis=1)
        ranks[start : start + block_size] = np.where(positive.any(axis=1), n_above, np.inf)
    return ranks


def compute_retrieval_recall(
    scores: np.ndarray, text_to_image: np.ndarray, ks: Sequence[int] = RECALL_KS
) -> dict[str, float]:
    """Recall@k both ways for (n_images, n_texts) scores; caption t describes image `text_to_image[t]`.

    "image_retrieval_recall@k": text -> image, over captions. "text_retrieval_recall@k":
    image -> text, over images, a hit if any of the image's captions is in the top k; an image
    with no captions is a miss. k beyond the number of candidates means all of them.
    """
    scores, text_to_image = np.asarray(scores), np.asarray(text_to_image).astype(np.int64)
    check_retrieval_inputs(scores, text_to_image, ks)
    image_ids = np.arange(scores.shape[0])
    text_query_ranks = compute_best_positive_ranks(scores.T, text_to_image, image_ids)  # (n_texts,)
    image_query_ranks = compute_best_positive_ranks(scores, image_ids, text_to_image)  # (n_images,)
    metrics = {}
    for k in ks:
        metrics[IMAGE_RETRIEVAL_KEY.format(k=k)] = float(np.mean(text_query_ranks < k))
        metrics[TEXT_RETRIEVAL_KEY.format(k=k)] = float(np.mean(image_query_ranks < k))
    return metrics


def retrieval_scores(image_features: np.ndarray, caption_features: np.ndarray, topology) -> np.ndarray:
    """(n_images, n_texts) similarities by the topology (training/methods/topology/spaces.py `score`)."""
    return np.asarray(topology.score(image_features, caption_features))


GALLERY_QUERIES = 4  # image queries shown per retrieval set
GALLERY_TOP = 3  # captions shown per query


def select_gallery(
    scores: np.ndarray, text_to_image: np.ndarray, n_queries: int = GALLERY_QUERIES, top: int = GALLERY_TOP
) -> list[tuple[int, list[tuple[int, float, bool]]]]:
    """A few image queries spread evenly over the set, each with its `top` best captions:
    [(image index, [(caption index, score, is a caption of this image), ...]), ...]."""
    scores, text_to_image = np.asarray(scores), np.asarray(text_to_image)
    queries = np.unique(np.linspace(0, scores.shape[0] - 1, min(n_queries, scores.shape[0])).round().astype(int))
    gallery = []
    for image in queries:
        best = np.argsort(-scores[image], kind="stable")[:top]
        gallery.append((int(image), [(int(t), float(scores[image, t]), bool(text_to_image[t] == image)) for t in best]))
    return gallery
