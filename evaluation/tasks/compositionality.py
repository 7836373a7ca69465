"""SugarCrepe accuracy: an image scores a hit when its true caption is strictly more similar
than the hard negative; per subset, then averaged by what is edited and by how."""

from __future__ import annotations

import numpy as np

from evaluation.datasets.compositional import SUGARCREPE_SUBSETS

AVERAGE_KEY = "average"


def compute_pair_accuracy(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Fraction of images whose positive caption beats its negative (a tie is a miss)."""
    positive_scores, negative_scores = np.asarray(positive_scores), np.asarray(negative_scores)
    if positive_scores.shape != negative_scores.shape or positive_scores.size == 0:
        raise ValueError(
            f"need one positive and one negative score per image, got {positive_scores.shape} "
            f"and {negative_scores.shape}"
        )
    if not (np.isfinite(positive_scores).all() and np.isfinite(negative_scores).all()):
        raise ValueError("scores contain NaN or inf")
    return float(np.mean(positive_scores > negative_scores))


def summarize_sugarcrepe(accuracies: dict[str, float]) -> dict[str, float]:
    """Per-subset accuracies plus the means over object / attribute / relation subsets, over
    replace / swap / add subsets, and over all seven."""
    summary = dict(accuracies)
    groups: dict[str, list[float]] = {}
    for subset, accuracy in accuracies.items():
        edit, target = SUGARCREPE_SUBSETS[subset]
        groups.setdefault(f"{AVERAGE_KEY}_{target}", []).append(accuracy)
        groups.setdefault(f"{AVERAGE_KEY}_{edit}", []).append(accuracy)
    summary.update({key: float(np.mean(values)) for key, values in groups.items()})
    summary[AVERAGE_KEY] = float(np.mean(list(accuracies.values())))
    return summary
