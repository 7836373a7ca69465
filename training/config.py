"""Typed, frozen configuration of a training job, built from a named method recipe and
overridden from the command line. Each component receives only its own section."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "clip-tiny-p8-64"
    pretrained: str | None = None  # a local open_clip checkpoint file


@dataclass(frozen=True)
class MaskingConfig:
    kind: str = "none"  # "none" | "random" (FLIP) | "pgs" (CLIP-PGS, bounds in the `pgs` section)
    ratio: float = 0.0  # fraction of patch tokens removed during training


@dataclass(frozen=True)
class PGSConfig:
    """CLIP-PGS patch selection (METHODS.md §2); used when masking.kind == "pgs"."""
    mode: str = "reference"  # "reference": released code's semantics | "paper": §2.5
    min_mask_ratio: float = 0.5  # the variant: PGS0.5 -> 0.5, PGS0.3 -> 0.3
    max_mask_ratio: float = 0.5
    candidate_ratio: float = 0.05  # initial (seed) patches
    use_edges: bool = True  # ED (Table 6 ablation)
    use_ot: bool = True  # OTN (Table 6 ablation)
    similarity_threshold: float = 0.5
    sinkhorn_iters: int = 50
    sinkhorn_reg: float = 0.1  # paper mode: kernel exp(S / reg)
    edge_protect_fraction: float = 0.2  # paper mode: strongest-edge patches never dropped


@dataclass(frozen=True)
class LossConfig:
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0  # the temperature is clipped at 1 / max_logit_scale
    gather_with_grad: bool = True
    local_loss: bool = False


@dataclass(frozen=True)
class DataConfig:
    build_uri: str = ""
    batch_size_per_worker: int = 64
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's)
    caption_policy: str = "uniform"  # one caption of the group per image per step
    preprocess_concurrency: int = 1  # Ray Data CPU tasks decoding for each training worker
    prefetch_batches: int = 4


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    grad_clip_norm: float = 1.0


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    storage: str = "./runs"  # local folder or s3:// prefix
    epochs: int = 1
    max_steps: int | None = None  # stop after this step; the LR schedule still spans all epochs
    max_failures: int = 0  # worker-group restarts from the latest checkpoint (Ray Train)
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    tensorboard_dir: str | None = None  # default: <storage>/<name>/tensorboard when local


@dataclass(frozen=True)
class TrainConfig:
    method: str = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    pgs: PGSConfig = field(default_factory=PGSConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def apply_overrides(config, overrides: dict[str, object]):
    """Replace dotted fields (`optim.lr`, `run.seed`) in a frozen config tree."""
    for dotted, value in overrides.items():
        config = _replace_path(config, dotted.split("."), value)
    return config


def _replace_path(node, path: list[str], value):
    names = {f.name: f for f in dataclasses.fields(node)}
    if path[0] not in names:
        raise ValueError(f"unknown config field {path[0]!r}; known: {', '.join(names)}")
    if len(path) == 1:
        return dataclasses.replace(node, **{path[0]: _coerce(getattr(node, path[0]), value)})
    child = _replace_path(getattr(node, path[0]), path[1:], value)
    return dataclasses.replace(node, **{path[0]: child})


def _coerce(current, value):
    """Parse a command-line string to the type of the field it replaces (an unset optional
    field takes JSON if the string is JSON, else the string itself, e.g. a path)."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if value in ("None", "none", "null"):
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        if current is None:
            return value
        raise ValueError(f"cannot parse {value!r} as a {type(current).__name__}") from None
    return tuple(parsed) if isinstance(current, tuple) else parsed


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict) -> TrainConfig:
    """Rebuild a TrainConfig from its saved JSON form (tuples restored)."""
    sections = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    kwargs = {"method": data["method"]}
    for name, cls in ((n, globals()[t]) for n, t in sections.items() if n != "method"):
        raw = dict(data.get(name, {}))
        for f in dataclasses.fields(cls):
            if isinstance(f.default, tuple) and f.name in raw:
                raw[f.name] = tuple(raw[f.name])
        kwargs[name] = cls(**raw)
    return TrainConfig(**kwargs)


def compute_global_batch(config: TrainConfig) -> int:
    return config.data.batch_size_per_worker * config.run.num_workers
