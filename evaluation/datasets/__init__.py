"""Readers for the benchmark sets the evaluation job scores, each returning a small frozen
dataclass of image references (URIs or bytes), labels and captions."""

from scoring.sets.classification import ClassificationSet, load_image_folder
from evaluation.datasets.compositional import CompositionSet, load_sugarcrepe
from scoring.sets.retrieval import (
    RetrievalSet,
    load_coco_captions,
    load_flickr_token,
    load_karpathy,
    load_long_caption_build,
    load_long_caption_folder,
)
from scoring.sets.wds import load_wds

__all__ = [
    "ClassificationSet",
    "CompositionSet",
    "RetrievalSet",
    "load_coco_captions",
    "load_flickr_token",
    "load_image_folder",
    "load_karpathy",
    "load_long_caption_build",
    "load_long_caption_folder",
    "load_sugarcrepe",
    "load_wds",
]
