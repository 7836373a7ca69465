"""Metrics of the evaluation tasks, defined as CLIP_benchmark defines them where it has them:
zero-shot classification (top-k, mean per-class recall, multi-label mAP), image-text retrieval
recall@k, the linear probe, SugarCrepe accuracy, intra-modal mAP and the modality gap."""

from evaluation.tasks.compositionality import compute_pair_accuracy, summarize_sugarcrepe
from evaluation.tasks.intra_modal import compute_modality_gap, compute_retrieval_map, compute_text_to_text_map
from evaluation.tasks.linear_probe import LinearProbeConfig, evaluate_linear_probe
from scoring.retrieval import compute_retrieval_recall
from scoring.zeroshot import build_zeroshot_weights, compute_multilabel_metrics, compute_zeroshot_metrics

__all__ = [
    "LinearProbeConfig",
    "build_zeroshot_weights",
    "compute_modality_gap",
    "compute_multilabel_metrics",
    "compute_pair_accuracy",
    "compute_retrieval_map",
    "compute_retrieval_recall",
    "compute_text_to_text_map",
    "compute_zeroshot_metrics",
    "evaluate_linear_probe",
    "summarize_sugarcrepe",
]
