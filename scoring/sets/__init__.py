"""Readers of the small labelled and captioned sets both the in-run evaluation and the
evaluation job read, each returning a frozen dataclass of image references (URIs or bytes),
labels and captions."""

from scoring.sets.classification import ClassificationSet, load_image_folder
from scoring.sets.retrieval import (
    RetrievalSet,
    load_coco_captions,
    load_flickr_token,
    load_karpathy,
    load_long_caption_build,
    load_long_caption_folder,
)
from scoring.sets.wds import load_wds

# format name -> reader(path, ...): the sets a dataset spec or an in-run "NAME=FORMAT:PATH" names
SET_READERS = {
    "wds": load_wds,
    "image_folder": load_image_folder,
    "karpathy": load_karpathy,
    "coco_captions": load_coco_captions,
    "flickr_token": load_flickr_token,
    "long_folder": load_long_caption_folder,
    "long_build": load_long_caption_build,
}
TEMPLATED = ("wds", "image_folder")  # readers that read the set's own prompt templates unless told not to

__all__ = [
    "SET_READERS",
    "TEMPLATED",
    "ClassificationSet",
    "RetrievalSet",
    "load_coco_captions",
    "load_flickr_token",
    "load_image_folder",
    "load_karpathy",
    "load_long_caption_build",
    "load_long_caption_folder",
    "load_wds",
]
