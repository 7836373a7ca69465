"""Export of a sphere checkpoint to open_clip's own checkpoint format."""

from __future__ import annotations

import torch

from pipelines import storage
from training.checkpoint import fetch_checkpoint, load_config, tower_state_dict


def export_open_clip(uri: str, out_file: str) -> str:
    """Write a file that `open_clip.create_model_and_transforms(arch, pretrained=out_file)`
    loads (open_clip reads it with weights_only=True: tensors and plain types only). Only a
    sphere checkpoint has that form: open_clip has no chunked, unnormalised or multi-[CLS]
    embedding, so any other topology is refused (evaluate it with evaluation/evaluate.py)."""
    directory = fetch_checkpoint(uri)
    config = load_config(directory)
    if config.topology.kind != "sphere":
        raise ValueError(
            f"cannot export a topology.kind={config.topology.kind} checkpoint to open_clip, which "
            "scores by the cosine of one vector; evaluate it with `python evaluation/evaluate.py "
            "--checkpoint <run or checkpoint>`, which ranks by the checkpoint's own topology"
        )
    payload = {"state_dict": tower_state_dict(directory), "arch": config.model.arch}
    fs, path = storage.open_storage(out_file)
    with fs.open(path, "wb") as f:
        torch.save(payload, f)
    return out_file
