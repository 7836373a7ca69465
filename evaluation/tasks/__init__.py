"""Evaluation tasks as pure NumPy functions: zero-shot classification and image-text retrieval,
with the metric definitions of CLIP_benchmark."""
from evaluation.tasks.retrieval import compute_retrieval_recall
from evaluation.tasks.zeroshot import build_zeroshot_weights, compute_zeroshot_metrics

__all__ = ["build_zeroshot_weights", "compute_retrieval_recall", "compute_zeroshot_metrics"]
