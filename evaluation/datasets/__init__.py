"""Readers for the benchmark sets the evaluation job scores: classification image folders
and image-caption retrieval sets, each returned as a small frozen dataclass of paths and labels."""
from evaluation.datasets.classification import ClassificationSet, load_image_folder
from evaluation.datasets.retrieval import RetrievalSet, load_karpathy, load_long_caption_folder

__all__ = [
    "ClassificationSet",
    "RetrievalSet",
    "load_image_folder",
    "load_karpathy",
    "load_long_caption_folder",
]
