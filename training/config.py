"""Typed, frozen configuration of a training job, built from a named method recipe and
overridden from the command line. Each component receives only its own section."""

from __future__ import annotations

import dataclasses
import json
import keyword
import math
from dataclasses import dataclass, field


DEFAULT_MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "clip-tiny-p8-64"
    # Starting weights: an open_clip pretrained tag ("openai"), an open_clip checkpoint file
    # (local or s3://), or a checkpoint / run directory of this project (its towers only).
    pretrained: str | None = None
    # Long-CLIP positional stretching (training/methods/longclip/positions.py): context n -> k + f·(n − k),
    # the first k rows frozen. factor 1 = off; Long-CLIP: keep 20, factor 4 (77 -> 248).
    text_positions_kept: int = 20
    text_stretch_factor: int = 1
    # What trains: "all", or "projections" (Cross the Gap §5.6: only the two towers' final
    # projection matrices, and the temperature when loss.learn_temperature; every other
    # weight stays bit-identical to its start).
    trainable: str = "all"


@dataclass(frozen=True)
class MaskingConfig:
    kind: str = "none"  # "none" | "random" (FLIP) | "pgs" (CLIP-PGS, bounds in the `pgs` section)
    ratio: float = 0.0  # fraction of patch tokens removed during training


@dataclass(frozen=True)
class PGSConfig:
    """CLIP-PGS patch selection (docs/methods/pgs.md); used when masking.kind == "pgs"."""

    mode: str = "reference"  # "reference": released code's semantics | "paper": docs/methods/pgs.md §5
    min_mask_ratio: float = 0.5  # the variant: PGS0.5 -> 0.5, PGS0.3 -> 0.3
    max_mask_ratio: float = 0.5
    candidate_ratio: float = 0.05  # initial (seed) patches
    use_edges: bool = True  # ED (Table 6 ablation)
    use_ot: bool = True  # OTN (Table 6 ablation)
    similarity_threshold: float = 0.5
    sinkhorn_iters: int = 50
    sinkhorn_reg: float = 0.1  # paper mode: kernel exp(S / reg)
    edge_protect_fraction: float = 0.2  # paper mode: strongest-edge patches never dropped
    # "batch_min": the hidden tokens every image of the step shares leave the sequence
    # physically (one count read to the host per step); "static": the sequence length never
    # depends on the data (no host read; the rest stays hidden by the key mask); "auto":
    # static under run.compile, batch_min otherwise (methods.resolve_auto_fields).
    compaction: str = "auto"


@dataclass(frozen=True)
class TopologyConfig:
    """The embedding space (training/methods/topology/spaces.py, docs/methods/topology.md)."""

    kind: str = "sphere"
    n: int = 0  # dimension of each sphere; 0: the tower's embed_dim / m
    m: int = 1  # number of spheres (oblique) or [CLS] tokens (multi)
    # multi only: the text tower's [CLS] slots. "prepend": before the text, bidirectional
    # pad-masked encoder (from scratch, the paper's setting); "append": after the text under
    # the causal mask (a pretrained causal CLIP text tower); "auto": append when
    # model.pretrained is set, else prepend (docs/methods/topology.md §3).
    text_tokens: str = "auto"


@dataclass(frozen=True)
class LossConfig:
    init_logit_scale: float = math.log(1 / 0.07)
    # The logit scale s is clipped at this value: None = 100, or 100 / m for topology.kind=multi
    # (the paper's main text, s·m <= 100; its appendix table's 3.95 is the `multi-s3.95` method).
    max_logit_scale: float | None = None
    learn_temperature: bool = True  # false: s stays at exp(init_logit_scale) (Table 3's fixed rows)
    gather_with_grad: bool = True
    local_loss: bool = False
    kind: str = "clip"  # objective: "clip" | "longclip" | "smartclip" (training/objectives.py)
    reset_logit_scale: bool = False  # pretrained start: set log-scale to init_logit_scale anyway
    label_smoothing: float = 0.0  # Long-CLIP trains with 0.1; SmartCLIP's Eq. 3 has none
    pca_components: int = 32  # Long-CLIP: short captions vs the batch's top-k image components
    # A regulariser added to the objective: "none" | "cibr" (the `cibr` section)
    regularizer: str = "none"


@dataclass(frozen=True)
class SmartClipConfig:
    """SmartCLIP's mask network and loss weights (docs/methods/smartclip.md §3, §5)."""

    mask_init_bias: float = 3.0  # sigmoid(3) = 0.95: masks start all ones (pretrained CLIP)
    lambda_align: float = 1.0
    lambda_sparsity: float = 0.01  # on the un-normalised L1 of the mask, batch mean


@dataclass(frozen=True)
class CibrConfig:
    """CIBR (docs/methods/cibr.md): L = L_CLIP + λ·[I(Z_v; X_v | X_t) + I(Z_t; X_t | X_v)].

    The paper's: the loss form, MINE as the estimator, λ ≈ 0.5, fine-tuning a pretrained CLIP.
    Ours (the paper is silent): X_v, X_t = a frozen copy of the starting towers' features
    before their final projections; Z = the trained embeddings plus Gaussian channel noise
    (noise_std per coordinate, only inside the regulariser); each conditional MI by the chain
    rule I(Z; X | C) = I(Z; [X, C]) − I(Z; C), four statistics networks on Z-shuffled
    (derangement) marginals; MINE's EMA bias correction; the estimators on the gathered global
    batch with their own Adam; one estimator update per step, warmup_estimator_steps during
    the first warmup_steps, where λ is 0 (the encoders meanwhile train on the base loss alone;
    docs/methods/cibr.md §2 discusses pretraining the estimators on the frozen start instead), then λ ramps
    linearly over ramp_steps; `lambda` on the command line is this `lambda_` field."""

    lambda_: float = 0.5
    estimator: str = "mine"  # "mine" | "mine_f" | "club" (an upper bound, docs/methods/cibr.md §2)
    noise_std: float = 0.02
    ema_rate: float = 0.01  # MINE's moving average of E_marg[e^T]
    estimator_lr: float = 1e-4
    estimator_betas: tuple[float, float] = (0.9, 0.999)
    hidden: int = 512  # width of each statistics network
    warmup_steps: int = 0  # first steps with λ = 0 (the estimators catch up)
    warmup_estimator_steps: int = 5  # estimator updates per step during the warm-up
    ramp_steps: int = 1000  # then λ grows linearly from 0 to lambda_ over these steps


@dataclass(frozen=True)
class DataConfig:
    # The run's builds, each "URI" or "URI:WEIGHT" (training/data_mixture.py; weights normalised).
    builds: tuple[str, ...] = ()
    batch_size_per_worker: int = 64
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range (open_clip's)
    # One caption of the group per image per step ("uniform", "short", "long", "mix": the long
    # caption with probability long_caption_fraction, else a short one), or "long_and_short"
    # (Long-CLIP: one long and one short caption per image).
    caption_policy: str = "uniform"
    long_caption_fraction: float = 0.5
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
    new_module_lr: float | None = None  # modules outside the CLIP towers (mask network); None: lr


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
    # Ray's placement of the worker group: "PACK" (its default: fill a node first), "SPREAD"
    # (one worker per node where possible), "STRICT_SPREAD" (one per node or wait), "STRICT_PACK"
    placement_strategy: str = "PACK"
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    # Micro-batches per step (gradient accumulation, training/accumulation.py): the per-worker
    # batch data.batch_size_per_worker is computed in accum_freq slices of equal size, with the
    # gradients of the whole batch (every sample still meets every other in the loss). Unlike
    # OpenCLIP's --accum-freq, this divides the batch rather than multiplying it: the data order
    # and the loss stay those of the configured batch. PGS selects within each micro-batch.
    accum_freq: int = 1
    # Recompute each transformer block's activations in backward (open_clip's
    # set_grad_checkpointing: both towers, PGS's and the multi-[CLS] paths included, as they
    # all run open_clip's Transformer): less activation memory for about a third more compute.
    grad_checkpointing: bool = False
    # "auto" (amp_bf16 on CUDA, fp32 elsewhere) | "fp32" | "amp_bf16" (bf16 autocast) | "bf16"
    # (bf16 weights and arithmetic, fp32 master weights in the optimiser): training/precision.py
    precision: str = "auto"
    # torch.compile of every transformer block of both towers (training/compilation.py;
    # OpenCLIP's --torchcompile); graph breaks are reported as compile/graph_breaks
    compile: bool = False
    # "ddp" | "fsdp" (PyTorch FSDP2: each rank keeps 1/world of the weights, gradients and
    # optimiser state; training/sharding.py). The checkpoint format is the same either way.
    sharding: str = "ddp"
    compile_backend: str = "inductor"  # | "aot_eager" | "eager" (to tell a compiler fault from a model one)
    tensorboard_dir: str | None = None  # default: <storage>/<name>/tensorboard (local or s3://)
    # Weights & Biases project (rank 0 logs what metrics.jsonl gets); WANDB_MODE / WANDB_DIR are
    # the driver's. None: no W&B.
    wandb_project: str | None = None


@dataclass(frozen=True)
class EvalConfig:
    """In-run evaluation, off by default (training/in_run_eval.py): every `every` steps and at
    the last step, zero-shot on each classification set and image-text retrieval on each
    captioned set of `sets`, scored by the evaluation job's own functions (scoring/) and logged
    as eval/<name>/<metric> beside the losses. Each set is "NAME=FORMAT:PATH", FORMAT one of
    scoring.sets.SET_READERS (image_folder, wds, karpathy, coco_captions, flickr_token,
    long_folder, long_build); PATH a local folder or file, or s3://. Every worker embeds its
    round-robin share of each set; the images are decoded once, at the start of the run."""

    every: int = 0  # 0: off
    sets: tuple[str, ...] = ()
    batch_size: int = 64  # images or texts embedded at once on each worker


@dataclass(frozen=True)
class TrainConfig:
    method: str = "clip"
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    pgs: PGSConfig = field(default_factory=PGSConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    smartclip: SmartClipConfig = field(default_factory=SmartClipConfig)
    cibr: CibrConfig = field(default_factory=CibrConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def apply_overrides(config, overrides: dict[str, object]):
    """Replace dotted fields (`optim.lr`, `run.seed`) in a frozen config tree."""
    for dotted, value in overrides.items():
        config = _replace_path(config, dotted.split("."), value)
    return config


def _replace_path(node, path: list[str], value):
    names = {f.name: f for f in dataclasses.fields(node)}
    if keyword.iskeyword(path[0]) and path[0] + "_" in names:  # `cibr.lambda` names `lambda_`
        path = [path[0] + "_", *path[1:]]
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
        if name == "data" and "build_uri" in raw:  # saved before mixtures: one build
            raw["builds"] = [raw.pop("build_uri")]
        for f in dataclasses.fields(cls):
            if isinstance(f.default, tuple) and f.name in raw:
                raw[f.name] = tuple(raw[f.name])
        kwargs[name] = cls(**raw)
    return TrainConfig(**kwargs)


def resolve_max_logit_scale(loss: LossConfig, topology: TopologyConfig) -> float:
    if loss.max_logit_scale is not None:
        return loss.max_logit_scale
    return DEFAULT_MAX_LOGIT_SCALE / (topology.m if topology.kind == "multi" else 1)


@dataclass(frozen=True)
class Temperature:
    """The towers' logit scale as the model needs it, resolved from the loss and topology
    sections (`temperature_of`), so that building a model never takes the loss config."""

    init_logit_scale: float = LossConfig.init_logit_scale
    max_logit_scale: float = DEFAULT_MAX_LOGIT_SCALE  # the sphere's; Multi's is 100 / m (temperature_of)
    learn: bool = LossConfig.learn_temperature
    reset: bool = LossConfig.reset_logit_scale  # a pretrained start takes init_logit_scale anyway


def temperature_of(loss: LossConfig, topology: TopologyConfig) -> Temperature:
    return Temperature(
        loss.init_logit_scale, resolve_max_logit_scale(loss, topology), loss.learn_temperature, loss.reset_logit_scale
    )
