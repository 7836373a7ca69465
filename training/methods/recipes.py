"""Training methods by name: each is a recipe of independent parts (patch selection,
topology, objective, ...) applied over the base configuration, naming the places under
training/methods/ its parts live in (tests/test_boundaries.py holds every recipe to that).
Any topology combines with any
patch selection (`--method flip --set topology.kind=multi --set topology.m=8`); a combination
that is not defined is refused by `check_combination` before anything is built."""

from __future__ import annotations

from dataclasses import dataclass, field

from training.config import TrainConfig, apply_overrides
from training.compilation import BACKENDS
from training.precision import check_precision
from training.sharding import SHARDINGS
from training.methods.topology.spaces import check_topology_config


# Long-CLIP's fine-tuning recipe (docs/methods/longclip.md §2), shared by SmartCLIP: 77 -> 248 text
# positions, lr 1e-6, wd 1e-2, AdamW (0.9, 0.999) eps 1e-8, 200 warm-up steps, logit scale
# reset to 100. Start from weights with `--pretrained`.
LONG_TEXT_FINETUNE = {
    "model.text_positions_kept": 20,
    "model.text_stretch_factor": 4,
    "optim.lr": 1e-6,
    "optim.weight_decay": 1e-2,
    "optim.betas": (0.9, 0.999),
    "optim.eps": 1e-8,
    "optim.warmup_steps": 200,
    "loss.init_logit_scale": 4.6052,
    "loss.reset_logit_scale": True,
}


@dataclass(frozen=True)
class MethodRecipe:
    description: str
    overrides: dict = field(default_factory=dict)
    # The places under training/methods/ that hold what the recipe adds to plain CLIP on the
    # sphere (a package or module name: "pgs" -> training/methods/pgs/).
    parts: tuple[str, ...] = ("clip",)


METHODS: dict[str, MethodRecipe] = {
    "clip": MethodRecipe(
        "CLIP: symmetric InfoNCE, all patch tokens", {"masking.kind": "none", "masking.ratio": 0.0}, parts=("clip",)
    ),
    "flip": MethodRecipe(
        "FLIP: random patch dropping (tokens removed from the sequence)",
        {"masking.kind": "random", "masking.ratio": 0.5},
        parts=("clip", "flip"),
    ),
    "longclip": MethodRecipe(
        "Long-CLIP: 248-token text, long-caption loss + short captions "
        "against the batch's top-32 image components (fine-tune)",
        {**LONG_TEXT_FINETUNE, "loss.kind": "longclip", "data.caption_policy": "long_and_short"},
        parts=("longclip",),
    ),
    "smartclip": MethodRecipe(
        "SmartCLIP: mask network, modular contrastive loss and L1 "
        "sparsity, one caption (long or short) per image per step (fine-tune)",
        {**LONG_TEXT_FINETUNE, "loss.kind": "smartclip", "data.caption_policy": "mix", "optim.new_module_lr": 1e-3},
        parts=("longclip", "smartclip"),
    ),
    # CLIP-PGS variants, named by their lower mask-ratio bound; `--set pgs.mode=paper` (docs/methods/pgs.md §5)
    # instead of the released code's semantics, `pgs.use_edges` / `pgs.use_ot` for Table 6.
    "pgs0.5": MethodRecipe(
        "CLIP-PGS0.5: edge/similarity-guided patch dropping, 50 % of patches",
        {"masking.kind": "pgs", "masking.ratio": 0.0, "pgs.min_mask_ratio": 0.5, "pgs.max_mask_ratio": 0.5},
        parts=("pgs",),
    ),
    "pgs0.3": MethodRecipe(
        "CLIP-PGS0.3: edge/similarity-guided patch dropping, 30-50 % of patches",
        {"masking.kind": "pgs", "masking.ratio": 0.0, "pgs.min_mask_ratio": 0.3, "pgs.max_mask_ratio": 0.5},
        parts=("pgs",),
    ),
    # Topologies (Design of the topology for contrastive visual-textual alignment, docs/methods/topology.md):
    # m = 8 spheres of embed_dim / 8 dims, Ob(64, 8) / Multi(64, 8) on a 512-d tower, Ob(16, 8) /
    # Multi(16, 8) on the 128-d CPU towers; `--set topology.n=32 --set topology.m=16` for Multi(32, 16).
    "oblique": MethodRecipe(
        "CLIP on the oblique manifold Ob(n, m): m chunk-normalised sub-vectors, "
        "similarity −tr = sum of per-sphere inner products",
        {"topology.kind": "oblique", "topology.m": 8},
        parts=("topology",),
    ),
    "oblique-geodesic": MethodRecipe(
        "Ob(n, m) with the geodesic distance sqrt(Σ arccos²) (Table 3 ablation)",
        {"topology.kind": "oblique_geodesic", "topology.m": 8},
        parts=("topology",),
    ),
    "multi": MethodRecipe(
        "Multi(n, m): m [CLS] tokens in both towers, a shared projection to n dims each, "
        "−tr similarity; the logit scale capped at 100 / m",
        {"topology.kind": "multi", "topology.m": 8},
        parts=("topology",),
    ),
    "multi-s3.95": MethodRecipe(
        "Multi(n, m) with the appendix table's maximum logit scale 3.95",
        {"topology.kind": "multi", "topology.m": 8, "loss.max_logit_scale": 3.95},
        parts=("topology",),
    ),
    "euclidean": MethodRecipe(
        "CLIP on unnormalised embeddings, similarity −‖u − v‖ (Table 3 ablation)",
        {"topology.kind": "euclidean", "topology.m": 1},
        parts=("topology",),
    ),
}

# CIBR's fine-tuning recipe (docs/methods/cibr.md §3): from `--pretrained`, the logit scale fixed at
# 100, AdamW lr 1e-6 (0.9, 0.98) eps 1e-6 wd 0.1; λ = 0.5 ramped in over 1000 steps.
METHODS["cibr"] = MethodRecipe(
    "CIBR: CLIP + λ·[I(Z_v; X_v | X_t) + I(Z_t; X_t | X_v)] by MINE against frozen starting towers (fine-tune)",
    {
        "loss.regularizer": "cibr",
        "loss.learn_temperature": False,
        "loss.init_logit_scale": 4.6052,
        "loss.reset_logit_scale": True,
        "optim.lr": 1e-6,
        "optim.weight_decay": 0.1,
        "optim.betas": (0.9, 0.98),
        "optim.eps": 1e-6,
    },
    parts=("cibr",),
)

# (loss.kind, topology kinds it is defined on): SmartCLIP's dimension masks select embedding
# coordinates of one unit vector, a scoring the paper defines on the sphere only.
OBJECTIVE_TOPOLOGIES = {"smartclip": ("sphere",)}


TRAINABLE = ("all", "projections")


def check_combination(config: TrainConfig) -> None:
    """Refuse parts that do not compose, naming both."""
    check_topology_config(config.topology)
    allowed = OBJECTIVE_TOPOLOGIES.get(config.loss.kind)
    if allowed and config.topology.kind not in allowed:
        raise ValueError(
            f"loss.kind={config.loss.kind} (its dimension masks) is defined on topology.kind "
            f"{' / '.join(allowed)} only, not topology.kind={config.topology.kind}"
        )
    if config.loss.regularizer == "cibr" and config.model.pretrained is None:
        raise ValueError(
            "loss.regularizer=cibr fine-tunes: its frozen reference towers are the starting "
            "weights, so set model.pretrained (--pretrained)"
        )
    if config.model.trainable not in TRAINABLE:
        raise ValueError(f"unknown model.trainable={config.model.trainable!r}; known: {', '.join(TRAINABLE)}")
    if config.model.trainable == "projections" and config.loss.kind == "smartclip":
        raise ValueError(
            "model.trainable=projections trains only the towers' final projections; "
            "loss.kind=smartclip's mask network would then never train"
        )
    check_precision(config.run.precision)
    accum = config.run.accum_freq
    batch = config.data.batch_size_per_worker
    if accum < 1 or batch % accum:
        raise ValueError(
            f"run.accum_freq={accum} must be >= 1 and divide data.batch_size_per_worker={batch} "
            "(the per-worker batch is computed in accum_freq equal micro-batches)"
        )
    check_compile(config)
    if config.run.sharding not in SHARDINGS:
        raise ValueError(f"unknown run.sharding={config.run.sharding!r}; known: {', '.join(SHARDINGS)}")


def check_compile(config: TrainConfig) -> None:
    if config.run.compile_backend not in BACKENDS:
        raise ValueError(f"unknown run.compile_backend={config.run.compile_backend!r}; known: {', '.join(BACKENDS)}")
    if config.run.compile and config.masking.kind == "pgs" and config.pgs.compaction == "batch_min":
        raise ValueError(
            "run.compile with CLIP-PGS needs pgs.compaction=static (or auto, its default): "
            "batch_min changes the sequence length every step, and each new length would "
            "recompile the blocks"
        )


def resolve_auto_fields(config: TrainConfig) -> TrainConfig:
    """Fix the fields whose default depends on other fields, so a saved config (and the model
    rebuilt from it for evaluation, without `pretrained`) means one thing: Multi's text route
    `auto` becomes `append` with pretrained weights, `prepend` from scratch; PGS's compaction
    `auto` becomes `static` for a compiled PGS run (a sequence length that never depends on the
    data: nothing recompiles), `batch_min` otherwise."""
    fields = {}
    if config.topology.text_tokens == "auto":
        fields["topology.text_tokens"] = "append" if config.model.pretrained else "prepend"
    if config.pgs.compaction == "auto":
        pgs_compiled = config.run.compile and config.masking.kind == "pgs"
        fields["pgs.compaction"] = "static" if pgs_compiled else "batch_min"
    return apply_overrides(config, fields) if fields else config


def build_method_config(method: str, base: TrainConfig | None = None) -> TrainConfig:
    """The configuration of a named method; unknown names list the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    config = apply_overrides(base or TrainConfig(), METHODS[method].overrides)
    return apply_overrides(config, {"method": method})
