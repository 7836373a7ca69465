"""Image-caption retrieval sets: Karpathy-split JSON (COCO, Flickr30k) and long-caption folders
(Urban1k), flattened to one caption list with the index of each caption's image."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluation.datasets.classification import is_image_file

KARPATHY_PROTOCOL = "karpathy-{split}"
LONG_CAPTION_PROTOCOL = "long-caption"
LONG_CAPTION_IMAGE_DIR = "image"
LONG_CAPTION_TEXT_DIR = "caption"
LONG_CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class RetrievalSet:
    """Images and captions; caption k describes image `text_to_image[k]`."""

    name: str
    protocol: str
    image_paths: list[Path]
    captions: list[str]
    text_to_image: np.ndarray  # (n_texts,) int64

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_texts(self) -> int:
        return len(self.captions)


def read_karpathy_entries(json_path: Path, split: str) -> list[dict]:
    """The image entries of one split, in file order; an empty split lists the splits present."""
    entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    chosen = [entry for entry in entries if entry["split"] == split]
    if not chosen:
        found = sorted({entry["split"] for entry in entries})
        raise ValueError(f"no images with split {split!r} in {json_path}; splits present: {found}")
    return chosen


def check_files_exist(paths: list[Path], source: str) -> None:
    """Fail before any encoding starts, naming one missing file, rather than mid-run at decode."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {source} are missing, e.g. {missing[0]}"
        )


def flatten_captions(caption_groups: list[list[str]]) -> tuple[list[str], np.ndarray]:
    """All captions in one list, with the index of the group (image) each came from."""
    captions = [caption for group in caption_groups for caption in group]
    text_to_image = np.repeat(np.arange(len(caption_groups), dtype=np.int64), [len(g) for g in caption_groups])
    return captions, text_to_image


def load_karpathy(
    json_path: str | Path, image_root: str | Path | None = None, split: str = "test", name: str | None = None
) -> RetrievalSet:
    """Read one split of a Karpathy `dataset_*.json`; images live at `image_root/filepath/filename`.

    Flickr30k's file has no `filepath` field, so a missing one means the image sits in `image_root`.
    """
    json_path = Path(json_path)
    image_root = Path(image_root) if image_root is not None else json_path.parent
    entries = read_karpathy_entries(json_path, split)
    image_paths = [image_root / entry.get("filepath", "") / entry["filename"] for entry in entries]
    check_files_exist(image_paths, f"{json_path} (image_root {image_root})")
    caption_groups = [[s["raw"].strip() for s in entry["sentences"]] for entry in entries]
    # An image without captions can never be retrieved correctly and would quietly lower
    # image->text recall (CLIP_benchmark counts it as a miss), so refuse it here.
    empty = [str(path) for path, group in zip(image_paths, caption_groups) if not group]
    if empty:
        raise ValueError(f"{len(empty)} images in {json_path} have no captions, e.g. {empty[0]}")
    captions, text_to_image = flatten_captions(caption_groups)
    protocol = KARPATHY_PROTOCOL.format(split=split)
    return RetrievalSet(name or json_path.stem, protocol, image_paths, captions, text_to_image)


def pair_images_with_captions(image_dir: Path, caption_dir: Path) -> list[tuple[Path, Path]]:
    """(image, caption file) pairs matched by file stem, sorted by stem; unmatched stems are an error."""
    images = {p.stem: p for p in image_dir.iterdir() if is_image_file(p)}
    texts = {p.stem: p for p in caption_dir.iterdir() if p.is_file() and p.suffix == LONG_CAPTION_SUFFIX}
    unmatched = sorted(images.keys() ^ texts.keys())
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} stems in {image_dir} / {caption_dir} lack an image or a caption, e.g. {unmatched[:5]}"
        )
    if not images:
        raise ValueError(f"no images in {image_dir}")
    return [(images[stem], texts[stem]) for stem in sorted(images)]


def load_long_caption_folder(root: str | Path, name: str | None = None) -> RetrievalSet:
    """Read the Urban1k layout: `root/image/<stem>.jpg` with one long caption in `root/caption/<stem>.txt`."""
    root = Path(root)
    image_dir, caption_dir = root / LONG_CAPTION_IMAGE_DIR, root / LONG_CAPTION_TEXT_DIR
    for folder in (image_dir, caption_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {folder}")
    pairs = pair_images_with_captions(image_dir, caption_dir)
    captions = [text_path.read_text(encoding="utf-8").strip() for _, text_path in pairs]
    empty = [str(text_path) for (_, text_path), caption in zip(pairs, captions) if not caption]
    if empty:
        raise ValueError(f"{len(empty)} empty caption files, e.g. {empty[0]}")
    text_to_image = np.arange(len(pairs), dtype=np.int64)
    return RetrievalSet(name or root.name, LONG_CAPTION_PROTOCOL, [p for p, _ in pairs], captions, text_to_image)
