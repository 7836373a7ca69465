"""Image-caption retrieval sets, flattened to one caption list with the index of each caption's
image: Karpathy-split JSON (COCO 5k, Flickr30k/8k 1k), COCO val2017 `captions_val2017.json`,
Flickr30k's whole-set `results_20130124.token`, Urban1k's folder and a ShareGPT4V-style shard
build (long captions). Local paths or s3://; the protocol is named in the set."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from scoring.sets.files import ImageRef, Location, check_files_exist
from pipelines import shards, storage

KARPATHY_PROTOCOL = "karpathy-{split}"
COCO_PROTOCOL = "coco-val2017-first{n}"  # SmartCLIP: 5k images, first 5 captions each
FLICKR_FULL_PROTOCOL = "flickr30k-full"  # SmartCLIP: all 31,783 images, all captions
LONG_CAPTION_PROTOCOL = "long-caption"
LONG_CAPTION_IMAGE_DIR = "image"
LONG_CAPTION_TEXT_DIR = "caption"
LONG_CAPTION_SUFFIX = ".txt"


@dataclass(frozen=True)
class RetrievalSet:
    """Images and captions; caption k describes image `text_to_image[k]`."""

    name: str
    protocol: str
    images: list[ImageRef]
    captions: list[str]
    text_to_image: np.ndarray  # (n_texts,) int64

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_texts(self) -> int:
        return len(self.captions)

    def caption_groups(self) -> list[list[str]]:
        """The captions of each image, in order."""
        groups = [[] for _ in range(self.n_images)]
        for caption, image in zip(self.captions, self.text_to_image):
            groups[image].append(caption)
        return groups


def flatten_captions(caption_groups: list[list[str]]) -> tuple[list[str], np.ndarray]:
    """All captions in one list, with the index of the group (image) each came from."""
    captions = [caption for group in caption_groups for caption in group]
    text_to_image = np.repeat(np.arange(len(caption_groups), dtype=np.int64), [len(g) for g in caption_groups])
    return captions, text_to_image


def build_set(name: str, protocol: str, images: list[str], groups: list[list[str]], source: str) -> RetrievalSet:
    """Check the images exist and every image has a caption (one without could never be retrieved
    and would quietly lower image->text recall), then flatten."""
    if not images:
        raise ValueError(f"no images in {source}")
    empty = [ref for ref, group in zip(images, groups) if not group]
    if empty:
        raise ValueError(f"{len(empty)} images in {source} have no captions, e.g. {empty[0]}")
    check_files_exist(images, source)
    captions, text_to_image = flatten_captions(groups)
    return RetrievalSet(name, protocol, images, captions, text_to_image)


def read_karpathy_entries(location: Location, split: str) -> list[dict]:
    """The image entries of one split, in file order; an empty split lists the splits present."""
    entries = json.loads(location.read_text("Karpathy JSON"))["images"]
    chosen = [entry for entry in entries if entry["split"] == split]
    if not chosen:
        found = sorted({entry["split"] for entry in entries})
        raise ValueError(f"no images with split {split!r} in {location.uri}; splits present: {found}")
    return chosen


def parent_uri(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def load_karpathy(
    json_path: str, image_root: str | None = None, split: str = "test", name: str | None = None
) -> RetrievalSet:
    """One split of a Karpathy `dataset_*.json`; images at `image_root/filepath/filename`
    (Flickr's file has no `filepath`: the image sits in `image_root`)."""
    location = Location(json_path)
    root = Location(image_root or parent_uri(location.uri))
    entries = read_karpathy_entries(location, split)
    images = [root.child(entry.get("filepath", ""), entry["filename"]).uri for entry in entries]
    groups = [[s["raw"].strip() for s in entry["sentences"]] for entry in entries]
    return build_set(
        name or location.name().rsplit(".", 1)[0],
        KARPATHY_PROTOCOL.format(split=split),
        images,
        groups,
        f"{location.uri} (image_root {root.uri})",
    )


def load_coco_captions(
    annotation_file: str, image_root: str | None = None, name: str | None = None, captions_per_image: int = 5
) -> RetrievalSet:
    """COCO `captions_val2017.json`: images by id, each with its first `captions_per_image`
    captions in file order. Images default to `<annotations/..>/val2017/<file_name>`."""
    location = Location(annotation_file)
    data = json.loads(location.read_text("COCO captions"))
    root = Location(image_root or storage.join(parent_uri(parent_uri(location.uri)), "val2017"))
    groups = defaultdict(list)
    for annotation in data["annotations"]:
        groups[annotation["image_id"]].append(annotation["caption"].strip())
    images = sorted(data["images"], key=lambda image: image["id"])  # torchvision CocoCaptions' order
    refs = [root.child(image["file_name"]).uri for image in images]
    caption_groups = [groups[image["id"]][:captions_per_image] for image in images]
    return build_set(
        name or "mscoco_val2017",
        COCO_PROTOCOL.format(n=captions_per_image),
        refs,
        caption_groups,
        f"{location.uri} (image_root {root.uri})",
    )


def load_flickr_token(token_file: str, image_root: str | None = None, name: str | None = None) -> RetrievalSet:
    """Flickr30k's `results_20130124.token` (`<file>.jpg#<i>\\t<caption>` lines): every image and
    caption, the whole-set protocol. Images default to `<token dir>/flickr30k-images/`."""
    location = Location(token_file)
    root = Location(image_root or storage.join(parent_uri(location.uri), "flickr30k-images"))
    groups: dict[str, list[str]] = {}
    for number, line in enumerate(location.read_text("Flickr30k token").splitlines(), 1):
        if not line.strip():
            continue
        tag, tab, caption = line.partition("\t")
        if not tab or "#" not in tag:
            raise ValueError(f"{location.uri} line {number}: expected '<image>#<i>\\t<caption>', got {line[:80]!r}")
        groups.setdefault(tag.rsplit("#", 1)[0], []).append(caption.strip())
    refs = [root.child(filename).uri for filename in groups]
    return build_set(
        name or "flickr30k_full",
        FLICKR_FULL_PROTOCOL,
        refs,
        list(groups.values()),
        f"{location.uri} (image_root {root.uri})",
    )


def load_long_caption_folder(root: str, name: str | None = None) -> RetrievalSet:
    """The Urban1k layout: `root/image/<stem>.jpg` with one long caption in `root/caption/<stem>.txt`."""
    location = Location(root)
    image_dir = location.child(LONG_CAPTION_IMAGE_DIR)
    caption_dir = location.child(LONG_CAPTION_TEXT_DIR)
    for folder in (image_dir, caption_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"missing folder {folder.uri}")
    images = {name.rsplit(".", 1)[0]: uri for name, uri in image_dir.image_files()}
    texts = {
        name[: -len(LONG_CAPTION_SUFFIX)]: uri
        for name, uri in caption_dir.entries(dirs=False)
        if name.endswith(LONG_CAPTION_SUFFIX)
    }
    unmatched = sorted(images.keys() ^ texts.keys())
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} stems in {image_dir.uri} / {caption_dir.uri} lack an image or "
            f"a caption, e.g. {unmatched[:5]}"
        )
    stems = sorted(images)
    captions = [Location(texts[stem]).read_text().strip() for stem in stems]
    empty = [texts[stem] for stem, caption in zip(stems, captions) if not caption]
    if empty:
        raise ValueError(f"{len(empty)} empty caption files, e.g. {empty[0]}")
    return build_set(
        name or location.name(),
        LONG_CAPTION_PROTOCOL,
        [images[s] for s in stems],
        [[c] for c in captions],
        location.uri,
    )


def first_long_caption(row: dict) -> str | None:
    captions = shards.load_sample_meta(row)["captions"]
    return next((c["text"] for c in captions if c["kind"] == shards.CAPTION_LONG), None)


def iter_build_rows(build_uri: str):
    """Sample rows of a shard build in manifest order (checksums verified)."""
    location = Location(build_uri)
    manifest = shards.read_manifest(build_uri)
    for entry in sorted(manifest["shards"], key=lambda e: e["id"]):
        yield from shards.read_shard_samples(location.fs, location.path, entry, verify=True)


def load_long_caption_build(build_uri: str, name: str | None = None, limit: int = 1000) -> RetrievalSet:
    """A shard build (pipelines/shards.py format) such as the ShareGPT4V-1k validation build: the
    first `limit` samples in manifest order, each with the long caption of its caption group."""
    images = []
    groups = []
    for row in itertools.islice(iter_build_rows(build_uri), limit):
        caption = first_long_caption(row)
        if caption is None:
            raise ValueError(f"sample {row[shards.KEY]} of {build_uri} has no long caption")
        images.append(row[shards.IMAGE])
        groups.append([caption])
    if not images:
        raise ValueError(f"no samples in build {build_uri}")
    captions, text_to_image = flatten_captions(groups)
    return RetrievalSet(name or Location(build_uri).name(), LONG_CAPTION_PROTOCOL, images, captions, text_to_image)
