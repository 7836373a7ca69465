"""The metric-learning sets Cross the Gap retrieves within, in their published layouts, as
classification sets (one label per image) for an `image_retrieval` entry whose gallery is its
own split (`"options": {"gallery": "test"}`: each query removed from its gallery).

CUB-200-2011 (Wah et al. 2011), folder `CUB_200_2011/`: `images.txt` ("<id> <relative path>"),
`image_class_labels.txt` ("<id> <class id>"), `classes.txt` ("<class id> 001.Black_footed_Albatross"),
`train_test_split.txt` ("<id> <1 if training>") and `images/`. The paper uses every image as
query and gallery (split "all"); "train" / "test" follow the official split file.

Stanford Online Products (Oh Song et al. 2016), folder `Stanford_Online_Products/`:
`Ebay_train.txt` / `Ebay_test.txt`, a header line then "<image id> <class id> <super class id>
<path>" with the path below the folder (e.g. `bicycle_final/111085122871_0.JPG`). The paper
uses the test split for both sides. Classes are numbered in order of first appearance."""

from __future__ import annotations

import numpy as np

from scoring.sets.classification import ClassificationSet
from scoring.sets.files import Location, check_files_exist, read_lines

CUB_SPLITS = ("all", "train", "test")
SOP_SPLITS = ("train", "test")
SOP_HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read_id_table(location: Location, what: str, columns: int) -> dict[str, list[str]]:
    """`<id> <value> ...` lines as id -> values, refusing short lines and repeated ids."""
    table: dict[str, list[str]] = {}
    for number, line in enumerate(read_lines(location, what), 1):
        fields = line.split(maxsplit=columns - 1)
        if len(fields) != columns:
            raise ValueError(f"{location.uri} line {number}: expected {columns} fields, got {line!r}")
        if fields[0] in table:
            raise ValueError(f"{location.uri} line {number}: id {fields[0]} appears twice")
        table[fields[0]] = fields[1:]
    return table


def cub_classname(folder_name: str) -> str:
    """`001.Black_footed_Albatross` -> `Black footed Albatross`."""
    return folder_name.split(".", 1)[-1].replace("_", " ")


def cub_image_ids(root: Location, split: str, ids: list[str]) -> list[str]:
    if split == "all":
        return ids
    training = read_id_table(root.child("train_test_split.txt"), "train/test split", 2)
    missing = [i for i in ids if i not in training]
    if missing:
        raise ValueError(f"{root.uri}: train_test_split.txt has no line for image {missing[0]}")
    return [i for i in ids if (training[i][0] == "1") == (split == "train")]


def load_cub(path: str, split: str = "all", name: str = "cub") -> ClassificationSet:
    """CUB-200-2011 in its published layout; images in image-id order (as `images.txt` numbers them)."""
    if split not in CUB_SPLITS:
        raise ValueError(f"CUB split {split!r}: expected one of {CUB_SPLITS}")
    root = Location(path)
    paths = read_id_table(root.child("images.txt"), "image list", 2)
    labels = read_id_table(root.child("image_class_labels.txt"), "image labels", 2)
    classes = read_id_table(root.child("classes.txt"), "class list", 2)
    class_ids = sorted(classes, key=int)
    index = {c: i for i, c in enumerate(class_ids)}
    ids = cub_image_ids(root, split, sorted(paths, key=int))
    unlabelled = [i for i in ids if i not in labels or labels[i][0] not in index]
    if unlabelled:
        raise ValueError(
            f"{root.uri}: image {unlabelled[0]} has no label in image_class_labels.txt naming a class of classes.txt"
        )
    images = [root.child("images", paths[i][0]).uri for i in ids]
    check_files_exist(images, root.child("images.txt").uri)
    return ClassificationSet(
        name,
        images,
        np.array([index[labels[i][0]] for i in ids], dtype=np.int64),
        [cub_classname(classes[c][0]) for c in class_ids],
        [],
    )


def read_sop_listing(location: Location) -> list[list[str]]:
    lines = read_lines(location, "image list")
    if not lines or lines[0].split() != SOP_HEADER:
        raise ValueError(f"{location.uri}: expected the header {' '.join(SOP_HEADER)!r}")
    rows = [line.split(maxsplit=3) for line in lines[1:]]
    short = [n for n, row in enumerate(rows, 2) if len(row) != 4]
    if short:
        raise ValueError(f"{location.uri} line {short[0]}: expected 4 fields")
    return rows


def load_sop(path: str, split: str = "test", name: str = "sop") -> ClassificationSet:
    """Stanford Online Products in its published layout; a class is named by its super class
    (the path's first folder without `_final`) and its product id."""
    if split not in SOP_SPLITS:
        raise ValueError(f"SOP split {split!r}: expected one of {SOP_SPLITS}")
    root = Location(path)
    listing = root.child(f"Ebay_{split}.txt")
    rows = read_sop_listing(listing)
    if not rows:
        raise ValueError(f"{listing.uri} lists no images")
    order = list(dict.fromkeys(row[1] for row in rows))
    index = {c: i for i, c in enumerate(order)}
    super_of = {row[1]: row[3].split("/", 1)[0].removesuffix("_final") for row in rows}
    images = [root.child(row[3]).uri for row in rows]
    check_files_exist(images, listing.uri)
    return ClassificationSet(
        name,
        images,
        np.array([index[row[1]] for row in rows], dtype=np.int64),
        [f"{super_of[c]} {c}" for c in order],
        [],
    )
