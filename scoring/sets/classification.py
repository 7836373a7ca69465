"""Classification sets for zero-shot classification and linear probes, from an image folder
(torchvision ImageFolder layout) next to a class-name file and a template file. Local or s3://.

ImageNet-A/-R/-O as distributed (one folder per WordNet id, a subset of the 1000 classes):
put the 1000 ImageNet class names in `classnames.txt` and their ids in `wnids.txt`; the
classes are the ids that have a folder, in ImageNet order, as CLIP_benchmark masks them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from scoring.sets.files import ImageRef, Location, read_lines

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILES = ("templates.txt", "zeroshot_classification_templates.txt")  # ours, CLIP_benchmark's
WNIDS_FILE = "wnids.txt"
ATTRIBUTES_FILE = "class_attributes.json"  # optional: {attribute: [value of class i, ...]}
CLASSNAME_FIELD = "{c}"  # CLIP_benchmark fills templates with template.format(c=classname)


@dataclass(frozen=True)
class ClassificationSet:
    """Images with labels: (N,) class indices, or (N, C) 0/1 for a multi-label set.
    Label i names `classnames[i]`; `templates` may be empty for a set used only by linear probes."""

    name: str
    images: list[ImageRef]
    labels: np.ndarray
    classnames: list[str]
    templates: list[str]
    attributes: dict[str, list[str]] = field(default_factory=dict)  # attribute -> value per class

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


def check_templates(templates: list[str], source: str) -> None:
    """Every template must take the class name as `{c}` and no other format field."""
    if not templates:
        raise ValueError(f"no templates in {source}")
    for template in templates:
        if CLASSNAME_FIELD not in template:
            raise ValueError(f"template {template!r} in {source} has no {CLASSNAME_FIELD} placeholder")
        try:
            template.format(c="x")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"template {template!r} in {source} is not a valid format string: {error}") from error


def read_templates(*folders: Location) -> list[str]:
    """Templates from the first of `templates.txt` / `zeroshot_classification_templates.txt` found."""
    for folder in folders:
        for filename in TEMPLATES_FILES:
            location = folder.child(filename)
            if location.exists():
                templates = read_lines(location, "templates")
                check_templates(templates, location.uri)
                return templates
    raise FileNotFoundError(f"missing templates file ({' or '.join(TEMPLATES_FILES)}) in {folders[0].uri}")


def select_class_subset(root: Location, dir_names: list[str], classnames: list[str]) -> list[str]:
    """Class names of the folders when they are a subset of the listed classes (ImageNet-A/R/O)."""
    wnids = read_lines(root.child(WNIDS_FILE), "class ids")
    if len(wnids) != len(classnames):
        raise ValueError(f"{root.uri}: {WNIDS_FILE} has {len(wnids)} ids for {len(classnames)} class names")
    unknown = sorted(set(dir_names) - set(wnids))
    if unknown:
        raise ValueError(f"{root.uri}: class folders {unknown[:5]} are not in {WNIDS_FILE}")
    if [w for w in wnids if w in set(dir_names)] != dir_names:
        raise ValueError(f"{root.uri}: {WNIDS_FILE} must list the ids in sorted order, as folders sort")
    return [name for wnid, name in zip(wnids, classnames) if wnid in set(dir_names)]


def match_classnames(root: Location, dir_names: list[str], classnames: list[str]) -> list[str]:
    if len(dir_names) == len(classnames):
        return classnames
    if len(dir_names) < len(classnames) and root.child(WNIDS_FILE).exists():
        return select_class_subset(root, dir_names, classnames)
    raise ValueError(
        f"{root.uri} has {len(dir_names)} class folders but {CLASSNAMES_FILE} names {len(classnames)} classes"
    )


def load_image_folder(
    root: str, name: str | None = None, split: str | None = None, need_templates: bool = True
) -> ClassificationSet:
    """Read `<root>[/<split>]/<class_dir>/*.{jpg,jpeg,png,webp}` with `classnames.txt` and a template
    file in `<root>[/<split>]` or `<root>`. Folder i in name order is class i (ImageFolder's rule)."""
    top = Location(root)
    folder = top.child(split) if split else top
    meta = folder if folder.child(CLASSNAMES_FILE).exists() else top
    classnames = read_lines(meta.child(CLASSNAMES_FILE), "class names")
    templates = read_templates(folder, top) if need_templates else []
    class_dirs = folder.entries(dirs=True)
    classnames = match_classnames(meta, [n for n, _ in class_dirs], classnames)
    per_class = [[uri for _, uri in Location(uri).image_files()] for _, uri in class_dirs]
    images = [uri for uris in per_class for uri in uris]
    if not images:
        raise ValueError(f"no images (.jpg, .jpeg, .png, .webp) under {folder.uri}")
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int64), [len(uris) for uris in per_class])
    attributes = read_class_attributes(meta.child(ATTRIBUTES_FILE), len(classnames))
    return ClassificationSet(name or top.name(), images, labels, classnames, templates, attributes)


def read_class_attributes(location: Location, n_classes: int) -> dict[str, list[str]]:
    """`class_attributes.json` when present ({} otherwise): each attribute's value per class, in
    class order, e.g. {"colour": ["red", "red", ...], "shape": ["circle", "square", ...]}."""
    if not location.exists():
        return {}
    attributes = json.loads(location.read_text("class attributes"))
    if not isinstance(attributes, dict) or not attributes:
        raise ValueError(f"{location.uri}: expected a non-empty object of attribute -> values per class")
    for attribute, values in attributes.items():
        if not isinstance(values, list) or len(values) != n_classes:
            raise ValueError(f"{location.uri}: attribute {attribute!r} needs one value per class ({n_classes})")
    return {attribute: [str(v) for v in values] for attribute, values in attributes.items()}
