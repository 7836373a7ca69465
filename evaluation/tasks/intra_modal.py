"""Intra-modal retrieval and the modality gap, as in "Cross the Gap" (docs/methods/inversion.md §4-5):
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

from training.methods.topology.spaces import Sphere

MAP_KEY = "mAP"
MAP_AT_R_KEY = "mAP@R"
R_PRECISION_KEY = "R-precision"
GAP_KEY = "modality_gap"
QUERY_BLOCK_SIZE = 256  # queries ranked at once, bounds the (block, gallery) temporaries

Similarity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def compute_average_precisions(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) AP over the full ranked gallery: mean of precision@rank at each relevant item's rank
    (torchmetrics' retrieval_average_precision); a query with no relevant item scores 0."""
    return compute_precision_metrics(scores, relevant)[MAP_KEY]


def compute_precision_metrics(scores: np.ndarray, relevant: np.ndarray) -> dict[str, np.ndarray]:
    """Per query (Q,), with R its number of relevant gallery items (0 when R = 0):
    AP ("mAP" once averaged); R-precision, the fraction of the top R that is relevant; and
    mAP@R (Musgrave et al. 2020, "A Metric Learning Reality Check"), the AP truncated at rank R:
    (1/R) Σ_{i≤R} P@i·rel_i."""
    order = np.argsort(-scores, axis=1, kind="stable")
    truth = np.take_along_axis(relevant, order, axis=1).astype(np.float64)  # (Q, M) in rank order
    ranks = np.arange(1, scores.shape[1] + 1)[None, :]
    precision = np.cumsum(truth, axis=1) / ranks
    n_relevant = truth.sum(axis=1)
    within_r = ranks <= n_relevant[:, None]
    denominator = np.maximum(n_relevant, 1)
    return {
        MAP_KEY: (precision * truth).sum(axis=1) / denominator,
        R_PRECISION_KEY: (truth * within_r).sum(axis=1) / denominator,
        MAP_AT_R_KEY: (precision * truth * within_r).sum(axis=1) / denominator,
    }


def compute_retrieval_metrics(
    queries: np.ndarray,
    query_owner: np.ndarray,
    gallery: np.ndarray,
    gallery_owner: np.ndarray,
    similarity: Similarity,
    block_size: int = QUERY_BLOCK_SIZE,
    query_ids: np.ndarray | None = None,
    gallery_ids: np.ndarray | None = None,
) -> dict[str, float]:
    """mAP, mAP@R and R-precision of ranking `gallery` for each query; gallery item j is
    relevant to query q when their owners (class label, source image) are equal. With ids
    (query and gallery drawn from one split, as CUB and SOP are evaluated), the gallery item
    that is the query itself is removed from that query's gallery."""
    if len(queries) == 0 or len(gallery) == 0:
        raise ValueError("intra-modal retrieval needs queries and a gallery")
    per_query: dict[str, list[np.ndarray]] = {key: [] for key in (MAP_KEY, MAP_AT_R_KEY, R_PRECISION_KEY)}
    for start in range(0, len(queries), block_size):
        rows = slice(start, start + block_size)
        scores = np.asarray(similarity(queries[rows], gallery), np.float64)
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")
        relevant = query_owner[rows, None] == gallery_owner[None, :]
        if query_ids is not None:
            scores, relevant = remove_self(scores, relevant, query_ids[rows], gallery_ids)
        for key, values in compute_precision_metrics(scores, relevant).items():
            per_query[key].append(values)
    return {key: float(np.mean(np.concatenate(values))) for key, values in per_query.items()}


def remove_self(
    scores: np.ndarray, relevant: np.ndarray, query_ids: np.ndarray, gallery_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The query's own gallery item ranked last and not relevant: below every finite score it
    changes none of the metrics, as if it were not in the gallery."""
    own = query_ids[:, None] == gallery_ids[None, :]
    return np.where(own, -np.inf, scores), relevant & ~own


def compute_retrieval_map(
    queries: np.ndarray,
    query_owner: np.ndarray,
    gallery: np.ndarray,
    gallery_owner: np.ndarray,
    similarity: Similarity,
    block_size: int = QUERY_BLOCK_SIZE,
) -> float:
    """The mAP of `compute_retrieval_metrics`."""
    return compute_retrieval_metrics(queries, query_owner, gallery, gallery_owner, similarity, block_size)[MAP_KEY]


def split_first_caption(text_to_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query caption indices, gallery caption indices): each image's first caption is its query."""
    _, first = np.unique(text_to_image, return_index=True)
    gallery = np.setdiff1d(np.arange(len(text_to_image)), first)
    return first, gallery


def compute_text_to_text_metrics(
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    similarity: Similarity,
    query_features: np.ndarray | None = None,
) -> dict[str, float]:
    """Each image's first caption queries the other captions; `query_features` (one row per
    image, in image order) replaces those captions' own features as queries (e.g. OVI)."""
    queries, gallery = split_first_caption(text_to_image)
    query_rows = text_features[queries] if query_features is None else query_features
    return compute_retrieval_metrics(
        query_rows, text_to_image[queries], text_features[gallery], text_to_image[gallery], similarity
    )


def compute_text_to_text_map(
    text_features: np.ndarray,
    text_to_image: np.ndarray,
    similarity: Similarity,
    query_features: np.ndarray | None = None,
) -> float:
    return compute_text_to_text_metrics(text_features, text_to_image, similarity, query_features)[MAP_KEY]


def compute_modality_gap(
    image_features: np.ndarray, text_features: np.ndarray, text_to_image: np.ndarray, topology: Sphere | None = None
) -> float:
    """The topology's gap over the n (image, caption) pairs (`Sphere.modality_gap`): on the
    sphere ‖(1/n) Σ x̂_i − (1/n) Σ ŷ_i‖ of L2-normalised features; on m chunks that distance
    of the chunk-normalised rows divided by √m (the root mean square of the m spheres' gaps);
    on the Euclidean topology the distance of the raw means."""
    return (topology or Sphere(1)).modality_gap(image_features[text_to_image], text_features)


# The revisited protocol's three settings: (relevant, ignored) built from a query's ground truth.
REVISITED_SETTINGS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def revisited_average_precision(ranked: np.ndarray, relevant: np.ndarray, ignored: np.ndarray) -> float:
    """The protocol's AP (revisitop's compute_ap): ignored items leave the ranking, then the
    trapezoid over recall steps of 1/|relevant| with 0-based ranks r_j of the relevant items,
    Σ_j (P_before + P_at) / 2 / |relevant| with P_before = j / r_j (1 at r_j = 0), P_at = (j + 1) / (r_j + 1)."""
    kept = ranked[~np.isin(ranked, ignored)]
    ranks = np.flatnonzero(np.isin(kept, relevant))
    j = np.arange(len(ranks))
    before = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    return float(((before + (j + 1) / (ranks + 1)) / 2).sum() / len(relevant))


def compute_revisited_map(
    queries: np.ndarray, gallery: np.ndarray, ground_truth: list[dict], similarity: Similarity, block_size: int = 8
) -> dict[str, float]:
    """mAP in each setting (easy / medium / hard), over the queries that have a relevant item
    in that setting; the gallery is ranked in blocks of queries (R1M galleries are large)."""
    per_setting: dict[str, list[float]] = {name: [] for name in REVISITED_SETTINGS}
    for start in range(0, len(queries), block_size):
        scores = np.asarray(similarity(queries[start : start + block_size], gallery), np.float64)
        if not np.isfinite(scores).all():
            raise ValueError("scores contain NaN or inf")
        for row, truth in zip(np.argsort(-scores, axis=1, kind="stable"), ground_truth[start : start + block_size]):
            for name, (relevant_keys, ignored_keys) in REVISITED_SETTINGS.items():
                relevant = np.concatenate([truth[k] for k in relevant_keys])
                if len(relevant):
                    ignored = np.concatenate([truth[k] for k in ignored_keys])
                    per_setting[name].append(revisited_average_precision(row, relevant, ignored))
    return {name: float(np.mean(values)) if values else float("nan") for name, values in per_setting.items()}
