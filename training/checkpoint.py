"""Checkpoints: weights and optimizer tensors in safetensors, everything else in JSON (no
unpickling on load), the resolved configuration to rebuild model and method, and an
export that `open_clip.create_model_and_transforms(arch, pretrained=file)` loads.

Layout of one checkpoint directory:
    model.safetensors      ContrastiveModel state dict ("tower." = the open_clip model)
    optimizer.safetensors  AdamW per-parameter tensors, keys "<param index>.<name>"
    state.json             step, config, scheduler, optimizer groups, data manifest digest,
                           code version and the sha256 of both tensor files (written last)
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines import storage
from training.config import TrainConfig, config_from_dict, config_to_dict

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"
TOWER_PREFIX = "tower."


def split_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(tensors for safetensors, plain JSON part) of an optimizer state dict."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict, plain: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entries in plain["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(directory: Path, model, optimizer, scheduler, step: int,
                    config: TrainConfig, extra: dict) -> Path:
    """Write a complete checkpoint into a local directory (state.json last)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in unwrap(model).state_dict().items()}
    save_file(weights, directory / MODEL_FILE)
    opt_tensors, opt_plain = split_optimizer_state(optimizer)
    save_file(opt_tensors, directory / OPTIMIZER_FILE)
    state = {"step": step, "config": config_to_dict(config), "optimizer": opt_plain,
             "scheduler": scheduler.state_dict(), **extra,
             "files": {name: storage.file_sha256(str(directory / name)) for name in (MODEL_FILE, OPTIMIZER_FILE)}}
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    return directory


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE_FILE).read_text())


def is_complete(directory: Path) -> bool:
    """All files present and matching the digests that state.json records."""
    try:
        files = read_state(directory)["files"]
    except (OSError, ValueError, KeyError):
        return False
    return all((directory / n).exists() and storage.file_sha256(str(directory / n)) == d for n, d in files.items())


def load_training_state(directory: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer and schedule in place; returns state.json."""
    if not is_complete(directory):
        raise ValueError(f"checkpoint {directory} is incomplete or corrupt")
    state = read_state(directory)
    unwrap(model).load_state_dict(load_file(directory / MODEL_FILE))
    optimizer.load_state_dict(join_optimizer_state(load_file(directory / OPTIMIZER_FILE), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    return state


def fetch_checkpoint(uri: str) -> Path:
    """A local directory holding the latest complete checkpoint at `uri` (a checkpoint
    directory or a run directory containing several), downloading from s3:// if needed."""
    fs, path = storage.open_storage(uri)
    candidates = [path] if fs.exists(storage.join(path, STATE_FILE)) else sorted(
        p.rsplit("/", 1)[0] for p in fs.glob(storage.join(path, "**", STATE_FILE)))
    local_dirs = [_localize(fs, c) for c in candidates]
    complete = [d for d in local_dirs if is_complete(d)]
    if not complete:
        raise FileNotFoundError(f"no complete checkpoint under {uri}")
    return max(complete, key=lambda d: read_state(d)["step"])


def _localize(fs, path: str) -> Path:
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or Path(path).exists():
        return Path(path)
    local = Path(tempfile.mkdtemp(prefix="ckpt-"))
    for name in (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE):
        if fs.exists(storage.join(path, name)):
            fs.get(storage.join(path, name), str(local / name))
    return local


def load_config(directory: Path) -> TrainConfig:
    return config_from_dict(read_state(directory)["config"])


def load_model_state_dict(directory: Path) -> dict:
    """The whole ContrastiveModel state dict (towers and any added modules)."""
    return load_file(directory / MODEL_FILE)


def tower_state_dict(directory: Path) -> dict:
    """The open_clip model's own state dict (tensors only) from a checkpoint."""
    weights = load_file(directory / MODEL_FILE)
    return {k[len(TOWER_PREFIX):]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)}


def export_open_clip(uri: str, out_file: str) -> str:
    """Write a file that `open_clip.create_model_and_transforms(arch, pretrained=out_file)`
    loads (open_clip reads it with weights_only=True: tensors and plain types only). Only a
    sphere checkpoint has that form: open_clip has no chunked, unnormalised or multi-[CLS]
    embedding, so any other topology is refused (evaluate it with evaluation/evaluate.py)."""
    directory = fetch_checkpoint(uri)
    config = load_config(directory)
    if config.topology.kind != "sphere":
        raise ValueError(f"cannot export a topology.kind={config.topology.kind} checkpoint to open_clip, which "
                         "scores by the cosine of one vector; evaluate it with `python evaluation/evaluate.py "
                         "--checkpoint <run or checkpoint>`, which ranks by the checkpoint's own topology")
    payload = {"state_dict": tower_state_dict(directory), "arch": config.model.arch}
    fs, path = storage.open_storage(out_file)
    with fs.open(path, "wb") as f:
        torch.save(payload, f)
    return out_file


@dataclass
class InferenceModel:
    """What evaluation needs from a checkpoint."""
    model: torch.nn.Module  # encode_image / encode_text -> the topology's embeddings, eval mode
    preprocess: object  # callable: encoded image bytes -> (3, H, W) float tensor
    tokenizer: object  # callable: list[str] -> LongTensor (N, context)
    topology: object  # training/topology.py: similarity, template rule, modality gap
    info: dict

    def similarity(self, image, text):
        """(N, D), (M, D) embeddings (NumPy or torch) -> (N, M) scores of the topology."""
        if isinstance(image, torch.Tensor):
            return self.topology.similarity(image, text)
        return self.topology.score(image, text)
