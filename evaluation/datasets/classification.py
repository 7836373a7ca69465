"""Zero-shot classification sets stored as an image folder (torchvision ImageFolder layout)
next to a `classnames.txt` and a `templates.txt` of prompt templates."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
CLASSNAME_FIELD = "{c}"  # CLIP_benchmark fills templates with template.format(c=classname)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})


@dataclass(frozen=True)
class ClassificationSet:
    """Images with one integer label each; label i names `classnames[i]`."""

    name: str
    image_paths: list[Path]
    labels: np.ndarray  # (n_images,) int64
    classnames: list[str]
    templates: list[str]

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_classes(self) -> int:
        return len(self.classnames)


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image suffix (any case, so `.JPG` counts)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def read_nonempty_lines(path: Path, what: str) -> list[str]:
    """The stripped, non-blank lines of `path`; a missing file is an error naming `what` it holds."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {what} file: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def check_templates(templates: list[str], path: Path) -> None:
    """Every template must take the class name as `{c}` and no other format field."""
    if not templates:
        raise ValueError(f"no templates in {path}")
    for template in templates:
        if CLASSNAME_FIELD not in template:
            raise ValueError(f"template {template!r} in {path} has no {CLASSNAME_FIELD} placeholder")
        try:
            template.format(c="x")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"template {template!r} in {path} is not a valid format string: {error}") from error


def list_class_dirs(root: Path) -> list[Path]:
    """Class folders sorted by name, so folder i is class i (torchvision's ImageFolder rule).

    Hidden folders (`.ipynb_checkpoints`, `.cache`) are left out: they are never classes.
    """
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def load_image_folder(root: str | Path, name: str | None = None) -> ClassificationSet:
    """Read `<root>/classnames.txt`, `<root>/templates.txt` and `<root>/<class_dir>/*.{jpg,jpeg,png}`."""
    root = Path(root)
    classnames = read_nonempty_lines(root / CLASSNAMES_FILE, "class names")
    templates = read_nonempty_lines(root / TEMPLATES_FILE, "templates")
    check_templates(templates, root / TEMPLATES_FILE)
    class_dirs = list_class_dirs(root)
    if len(class_dirs) != len(classnames):
        raise ValueError(
            f"{root} has {len(class_dirs)} class folders but {root / CLASSNAMES_FILE} names {len(classnames)} classes"
        )
    per_class = [sorted(p for p in class_dir.iterdir() if is_image_file(p)) for class_dir in class_dirs]
    image_paths = [path for paths in per_class for path in paths]
    if not image_paths:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    labels = np.repeat(np.arange(len(class_dirs), dtype=np.int64), [len(paths) for paths in per_class])
    return ClassificationSet(name or root.name, image_paths, labels, classnames, templates)
