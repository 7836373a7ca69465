"""SugarCrepe (Hsieh et al. 2023): seven JSON files, each `{id: {filename, caption,
negative_caption}}` over COCO val2017 images, read as CLIP_benchmark's `SugarCrepe` does."""

from __future__ import annotations

import json
from dataclasses import dataclass

from scoring.sets.files import ImageRef, Location, check_files_exist

# subset -> (edit, what is edited); the file is `<subset>.json`.
SUGARCREPE_SUBSETS = {
    "replace_obj": ("replace", "object"),
    "replace_att": ("replace", "attribute"),
    "replace_rel": ("replace", "relation"),
    "swap_obj": ("swap", "object"),
    "swap_att": ("swap", "attribute"),
    "add_obj": ("add", "object"),
    "add_att": ("add", "attribute"),
}
SUGARCREPE_PROTOCOL = "sugarcrepe"


@dataclass(frozen=True)
class CaptionPairs:
    """One subset: image i with its true caption `positives[i]` and hard negative `negatives[i]`."""

    images: list[ImageRef]
    positives: list[str]
    negatives: list[str]


@dataclass(frozen=True)
class CompositionSet:
    name: str
    protocol: str
    subsets: dict[str, CaptionPairs]

    @property
    def n_images(self) -> int:
        return sum(len(pairs.images) for pairs in self.subsets.values())


def read_subset(location: Location, image_root: Location) -> CaptionPairs:
    entries = json.loads(location.read_text("SugarCrepe subset")).values()  # ids may be non-contiguous
    pairs = CaptionPairs(
        [image_root.child(e["filename"]).uri for e in entries],
        [e["caption"] for e in entries],
        [e["negative_caption"] for e in entries],
    )
    if not pairs.images:
        raise ValueError(f"no samples in {location.uri}")
    return pairs


def load_sugarcrepe(root: str, image_root: str | None = None, name: str | None = None) -> CompositionSet:
    """`<root>/<subset>.json` for the seven subsets; images at `image_root/<filename>`
    (default `<root>/val2017`). Every subset must be present."""
    location = Location(root)
    images = Location(image_root) if image_root else location.child("val2017")
    missing = [s for s in SUGARCREPE_SUBSETS if not location.child(f"{s}.json").exists()]
    if missing:
        raise FileNotFoundError(f"SugarCrepe files missing in {location.uri}: {[f'{s}.json' for s in missing]}")
    subsets = {s: read_subset(location.child(f"{s}.json"), images) for s in SUGARCREPE_SUBSETS}
    check_files_exist(
        sorted({ref for pairs in subsets.values() for ref in pairs.images}), f"{location.uri} (image_root {images.uri})"
    )
    return CompositionSet(name or "sugarcrepe", SUGARCREPE_PROTOCOL, subsets)
