"""Checkpoints: weights and optimizer tensors in safetensors, everything else in JSON (no
unpickling on load) and the resolved configuration to rebuild model and method. (The export
to open_clip's format is training/export.py; what evaluation reads, training/inference.py.)

Layout of one checkpoint directory:
    model.safetensors      ContrastiveModel state dict ("tower." = the open_clip model)
    optimizer.safetensors  AdamW per-parameter tensors, keys "<param index>.<name>"
    auxiliary.<part>.safetensors            a trainable auxiliary part's weights and buffers
    auxiliary.<part>.optimizer.safetensors  ... and its optimizer's tensors
    state.json             step, config, scheduler, optimizer groups, data manifest digest,
                           code version, each auxiliary part's optimizer groups (or, for a
                           frozen part, the digest of its one copy in the run directory,
                           `<run>/<part>.safetensors`) and the sha256 of every tensor file
                           (written last)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipelines import storage
from training.config import TrainConfig, config_from_dict, config_to_dict

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TOWER_PREFIX = "tower."


def split_optimizer_state(optimizer: torch.optim.Optimizer | dict) -> tuple[dict, dict]:
    """(tensors for safetensors, plain JSON part) of an optimizer's state dict (or the dict)."""
    state = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors = {}
    scalars = {}
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


def detached(state: dict) -> dict:
    """A state dict's tensors as safetensors writes them (CPU, contiguous, no graph)."""
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def tensors_of(module: torch.nn.Module) -> dict:
    return detached(module.state_dict())


def part_files(name: str) -> tuple[str, str]:
    return f"auxiliary.{name}.safetensors", f"auxiliary.{name}.optimizer.safetensors"


def save_checkpoint(
    directory: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    config: TrainConfig,
    extra: dict,
    parts=(),
    run_dir: str | None = None,
    gathered: tuple[dict, dict] | None = None,
) -> Path:
    """Write a complete checkpoint into a local directory (state.json last); a frozen
    auxiliary part is written once into `run_dir` instead (training/auxiliary.py).
    `gathered`: (model state, optimizer state dict) already gathered from a sharded model
    (training/sharding.py), written in place of `model`'s and `optimizer`'s own."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, opt_state = gathered if gathered else (unwrap(model).state_dict(), optimizer)
    save_file(detached(weights), directory / MODEL_FILE)
    opt_tensors, opt_plain = split_optimizer_state(opt_state)
    save_file(opt_tensors, directory / OPTIMIZER_FILE)
    names = [MODEL_FILE, OPTIMIZER_FILE]
    auxiliary = {}
    for part in parts:
        if part.frozen:
            auxiliary[part.name] = {"run_file": f"{part.name}.safetensors", "sha256": store_once(part, run_dir)}
            continue
        weights_file, optimizer_file = part_files(part.name)
        save_file(tensors_of(part.module), directory / weights_file)
        tensors, plain = split_optimizer_state(part.optimizer)
        save_file(tensors, directory / optimizer_file)
        auxiliary[part.name], names = {"optimizer": plain}, names + [weights_file, optimizer_file]
    state = {
        "step": step,
        "config": config_to_dict(config),
        "optimizer": opt_plain,
        "scheduler": scheduler.state_dict(),
        **extra,
        **({"auxiliary": auxiliary} if auxiliary else {}),
        "files": {name: storage.file_sha256(str(directory / name)) for name in names},
    }
    (directory / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    return directory


def store_once(part, run_dir: str | None) -> str:
    """sha256 of a frozen part's weights in `<run_dir>/<name>.safetensors`, written there
    (atomically) if absent or different; the digest is kept on the part after the first time.
    Rank 0 writes it with its first checkpoint, so a checkpoint never names a copy that is not
    there."""
    if getattr(part, "sha256", None):
        return part.sha256
    if run_dir is None:
        raise ValueError(f"auxiliary part {part.name!r} is stored in the run directory: pass run_dir")
    uri = storage.join(run_dir, f"{part.name}.safetensors")
    fs, target = storage.open_storage(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / f"{part.name}.safetensors"
        save_file(tensors_of(part.module), local)
        digest = storage.file_sha256(str(local))
        if not fs.exists(target) or storage.file_sha256(uri) != digest:
            # absent, or left by an earlier run of this name that died before its first
            # checkpoint (a run with checkpoints is never restarted under its name)
            storage.put_file_atomic(fs, str(local), target)
    part.sha256 = digest
    return digest


def load_part(part, directory: Path, state: dict, run_dir: str | None) -> None:
    """Restore one auxiliary part in place from a checkpoint (a frozen one from the run
    directory, checked against the digest the checkpoint recorded)."""
    record = state.get("auxiliary", {}).get(part.name)
    if record is None:
        raise ValueError(f"checkpoint {directory} has no auxiliary part {part.name!r}")
    if part.frozen:
        if run_dir is None:
            raise ValueError(f"auxiliary part {part.name!r} is read from the run directory: pass run_dir")
        fs, path = storage.open_storage(storage.join(run_dir, record["run_file"]))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / record["run_file"]
            fs.get(path, str(local))
            if storage.file_sha256(str(local)) != record["sha256"]:
                raise ValueError(f"{path} does not match the digest checkpoint {directory} recorded")
            part.module.load_state_dict(load_file(local))
        part.sha256 = record["sha256"]
        return
    weights_file, optimizer_file = part_files(part.name)
    part.module.load_state_dict(load_file(directory / weights_file))
    part.optimizer.load_state_dict(join_optimizer_state(load_file(directory / optimizer_file), record["optimizer"]))


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


def load_training_state(directory: Path, model, optimizer, scheduler, parts=(), run_dir: str | None = None) -> dict:
    """Restore weights, optimizer, schedule and auxiliary parts in place; returns state.json."""
    if not is_complete(directory):
        raise ValueError(f"checkpoint {directory} is incomplete or corrupt")
    state = read_state(directory)
    unwrap(model).load_state_dict(load_file(directory / MODEL_FILE))
    optimizer.load_state_dict(join_optimizer_state(load_file(directory / OPTIMIZER_FILE), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    for part in parts:
        load_part(part, directory, state, run_dir)
    return state


def fetch_checkpoint(uri: str, cache_dir: str | None = None) -> Path:
    """A local directory holding the latest complete checkpoint at `uri` (a checkpoint
    directory or a run directory containing several), downloading from s3:// if needed (into
    `cache_dir` when given, shared by the processes of one machine)."""
    return locate_checkpoint(uri, cache_dir)[1]


def locate_checkpoint(uri: str, cache_dir: str | None = None) -> tuple[str, Path]:
    """(URI of the latest complete checkpoint at `uri`, a local directory holding it). Newest
    first by the step its state.json records, downloading one checkpoint at a time until a
    complete one is found."""
    fs, path = storage.open_storage(uri)
    candidates = (
        [path]
        if fs.exists(storage.join(path, STATE_FILE))
        else [p.rsplit("/", 1)[0] for p in fs.glob(storage.join(path, "**", STATE_FILE))]
    )
    steps = {}
    for candidate in candidates:
        try:
            steps[candidate] = json.loads(storage.read_bytes(fs, storage.join(candidate, STATE_FILE)))["step"]
        except (OSError, ValueError, KeyError):  # a torn state.json: not a checkpoint
            continue
    for candidate in sorted(steps, key=steps.get, reverse=True):
        local = _localize(fs, candidate, cache_dir)
        if is_complete(local):
            return rebuild_uri(uri, candidate), local
    raise FileNotFoundError(f"no complete checkpoint under {uri}")


def rebuild_uri(uri: str, found: str) -> str:
    """`found` (a path of the filesystem `uri` names) as a URI of the same form as `uri`."""
    return f"{uri.split('://', 1)[0]}://{found}" if "://" in uri else found


def _localize(fs, path: str, cache_dir: str | None = None) -> Path:
    if getattr(fs, "protocol", None) in ("file", ("file", "local")) or Path(path).exists():
        return Path(path)
    if cache_dir is not None:
        return _localize_shared(fs, path, Path(cache_dir))
    local = Path(tempfile.mkdtemp(prefix="ckpt-"))
    _download(fs, path, local)
    return local


def _download(fs, path: str, local: Path) -> None:
    if not fs.exists(storage.join(path, STATE_FILE)):
        return
    fs.get(storage.join(path, STATE_FILE), str(local / STATE_FILE))
    try:
        names = read_state(local).get("files", {})
    except ValueError:  # a torn state.json: is_complete says so
        return
    for name in names:  # every tensor file state.json names
        if fs.exists(storage.join(path, name)):
            fs.get(storage.join(path, name), str(local / name))


def _localize_shared(fs, path: str, cache_dir: Path) -> Path:
    """One download per machine: the first process to take the lock downloads, the others
    find the complete copy (the folder is named by the checkpoint's path)."""
    import fcntl

    local = cache_dir / hashlib.sha256(path.encode()).hexdigest()[:24]
    local.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{local.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_complete(local):
            _download(fs, path, local)
    return local


def load_config(directory: Path) -> TrainConfig:
    return config_from_dict(read_state(directory)["config"])


def load_model_state_dict(directory: Path) -> dict:
    """The whole ContrastiveModel state dict (towers and any added modules)."""
    return load_file(directory / MODEL_FILE)


def tower_state_dict(directory: Path) -> dict:
    """The open_clip model's own state dict (tensors only) from a checkpoint."""
    weights = load_file(directory / MODEL_FILE)
    return {k[len(TOWER_PREFIX) :]: v for k, v in weights.items() if k.startswith(TOWER_PREFIX)}
