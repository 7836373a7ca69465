"""CLIP_benchmark's WebDataset layout, as LAION distributes its benchmark copies
(`clip_benchmark.datasets.builder.build_wds_dataset` reads the same files):

    <root>/<split>/nshards.txt, <root>/<split>/0.tar ... <n-1>.tar   (an image + `cls` | `npy` | `txt`)
    <root>/classnames.txt, <root>/zeroshot_classification_templates.txt, <root>/dataset_type.txt

`dataset_type.txt` is "retrieval" (captions in `txt`, one per line), "multilabel" (an `npy`
0/1 vector per image) or absent / "classification" (an integer in `cls`). Local or s3://.
Images are not loaded here: each is referred to by its byte range inside its shard, so a set
as large as ImageNet's train split costs the driver only its labels.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator

import numpy as np

from scoring.sets.classification import CLASSNAMES_FILE, ClassificationSet, check_templates
from scoring.sets.files import Location, range_ref, read_lines
from scoring.sets.retrieval import RetrievalSet, flatten_captions

NSHARDS_FILE = "nshards.txt"
TYPE_FILE = "dataset_type.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
IMAGE_EXTS = ("webp", "png", "jpg", "jpeg")  # CLIP_benchmark's preference order
WDS_PROTOCOL = "clip_benchmark-wds-{split}"


def iter_tar_members(shard: Location) -> Iterator[tuple[str, dict[str, bytes | str]]]:
    """(key, {ext: value}) per sample, grouped as WebDataset groups consecutive members; an
    image's value is its byte-range reference, other members' values their bytes."""
    key = None
    members = {}
    with shard.fs.open(shard.path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            directory, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            name, ext = (f"{directory}/{stem}" if directory else stem), ext.lower()
            if key is not None and name != key:
                yield key, members
                members = {}
            key = name
            members[ext] = (
                range_ref(shard.uri, member.offset_data, member.size)
                if ext in IMAGE_EXTS
                else tar.extractfile(member).read()
            )
    if key is not None:
        yield key, members


def iter_wds_samples(root: Location, split: str) -> Iterator[tuple[str, dict[str, bytes | str]]]:
    folder = root.child(split)
    n_shards = int(folder.child(NSHARDS_FILE).read_text("shard count").strip())
    for shard in range(n_shards):
        yield from iter_tar_members(folder.child(f"{shard}.tar"))


def pick(members: dict, exts: tuple[str, ...], key: str):
    for ext in exts:
        if ext in members:
            return members[ext]
    raise ValueError(f"sample {key} has none of {exts} (it has {sorted(members)})")


def read_dataset_type(root: Location) -> str:
    location = root.child(TYPE_FILE)
    return location.read_text().strip().lower() if location.exists() else "classification"


def decode_label(members: dict[str, bytes], dataset_type: str, key: str) -> np.ndarray | int:
    if dataset_type == "multilabel":
        return np.load(io.BytesIO(pick(members, ("npy",), key)))
    return int(pick(members, ("cls",), key).decode("utf-8").strip())


def load_wds_classification(
    root: Location, split: str, name: str, dataset_type: str, need_templates: bool
) -> ClassificationSet:
    classnames = read_lines(root.child(CLASSNAMES_FILE), "class names")
    templates = read_lines(root.child(TEMPLATES_FILE), "templates") if need_templates else []
    if need_templates:
        check_templates(templates, root.child(TEMPLATES_FILE).uri)
    images = []
    labels = []
    for key, members in iter_wds_samples(root, split):
        images.append(pick(members, IMAGE_EXTS, key))
        labels.append(decode_label(members, dataset_type, key))
    if not images:
        raise ValueError(f"no samples in {root.uri}/{split}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.max() >= len(classnames) or (labels.ndim == 2 and labels.shape[1] != len(classnames)):
        raise ValueError(f"{root.uri}: labels do not fit the {len(classnames)} classes of {CLASSNAMES_FILE}")
    return ClassificationSet(name, images, labels, classnames, templates)


def load_wds_retrieval(root: Location, split: str, name: str) -> RetrievalSet:
    images = []
    groups = []
    for key, members in iter_wds_samples(root, split):
        images.append(pick(members, IMAGE_EXTS, key))
        groups.append(pick(members, ("txt",), key).decode("utf-8").splitlines())
    if not images:
        raise ValueError(f"no samples in {root.uri}/{split}")
    captions, text_to_image = flatten_captions(groups)
    return RetrievalSet(name, WDS_PROTOCOL.format(split=split), images, captions, text_to_image)


def load_wds(
    root: str, split: str = "test", name: str | None = None, need_templates: bool = True
) -> ClassificationSet | RetrievalSet:
    """Read one split of a CLIP_benchmark WebDataset folder (images as byte ranges of its shards)."""
    location = Location(root)
    if not location.child(split, NSHARDS_FILE).exists():
        raise FileNotFoundError(f"missing {location.uri}/{split}/{NSHARDS_FILE}: not a CLIP_benchmark WebDataset split")
    name = name or location.name().removeprefix("wds_")
    dataset_type = read_dataset_type(location)
    if dataset_type == "retrieval":
        return load_wds_retrieval(location, split, name)
    if dataset_type not in ("classification", "multilabel"):
        raise ValueError(f"{location.uri}: unknown {TYPE_FILE} {dataset_type!r}")
    return load_wds_classification(location, split, name, dataset_type, need_templates)
