"""Starting weights of a fine-tune (`model.pretrained`): an open_clip pretrained tag (open_clip
downloads it; needs internet), an open_clip checkpoint file (local or s3://, localised with
fsspec first), or a checkpoint / run directory of this project (training/checkpoint.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import open_clip
from torch import nn

from pipelines import storage
from training import checkpoint
from training.towers import build_tower_model


def localize_file(fs, path: str) -> str:
    """A local path of a file on any fsspec filesystem (downloaded when remote)."""
    if Path(path).is_file():
        return path
    local = Path(tempfile.mkdtemp(prefix="pretrained-")) / Path(path).name
    fs.get(path, str(local))
    return str(local)


def load_project_checkpoint(arch: str, uri: str) -> nn.Module:
    """The open_clip towers of a checkpoint of this project (its own arch must match)."""
    directory = checkpoint.fetch_checkpoint(uri)
    saved = checkpoint.load_config(directory).model
    if saved.arch != arch:
        raise ValueError(f"checkpoint {uri} holds a {saved.arch!r} model, not {arch!r}")
    if saved.text_stretch_factor != 1:
        raise ValueError(
            f"checkpoint {uri} has a stretched text context: starting a fine-tune "
            "from it is not supported (its positional table no longer matches the arch)"
        )
    tower = build_tower_model(arch)
    tower.load_state_dict(checkpoint.tower_state_dict(directory))
    return tower


def load_pretrained_tower(arch: str, pretrained: str | None) -> nn.Module:
    """An open_clip model for `arch` with the weights that `pretrained` names."""
    if pretrained is None:
        return build_tower_model(arch)
    fs, path = storage.open_storage(pretrained)
    if fs.isfile(path):
        return build_tower_model(arch, pretrained=localize_file(fs, path))
    if fs.isdir(path):
        return load_project_checkpoint(arch, pretrained)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained not in tags:
        raise ValueError(
            f"pretrained {pretrained!r} is neither a file, a checkpoint directory nor "
            f"an open_clip tag of {arch!r} (tags: {', '.join(tags) or 'none'})"
        )
    return build_tower_model(arch, pretrained=pretrained)
