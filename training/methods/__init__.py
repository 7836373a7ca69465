"""Training methods by name: each is a recipe of independent parts (patch selection,
objective, ...) applied over the base configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

from training.config import TrainConfig, apply_overrides


@dataclass(frozen=True)
class MethodRecipe:
    description: str
    overrides: dict = field(default_factory=dict)


METHODS: dict[str, MethodRecipe] = {
    "clip": MethodRecipe("CLIP: symmetric InfoNCE, all patch tokens",
                         {"masking.kind": "none", "masking.ratio": 0.0}),
    "flip": MethodRecipe("FLIP: random patch dropping (tokens removed from the sequence)",
                         {"masking.kind": "random", "masking.ratio": 0.5}),
    # CLIP-PGS variants, named by their lower mask-ratio bound; `--set pgs.mode=paper` (§2.5)
    # instead of the released code's semantics, `pgs.use_edges` / `pgs.use_ot` for Table 6.
    "pgs0.5": MethodRecipe("CLIP-PGS0.5: edge/similarity-guided patch dropping, 50 % of patches",
                           {"masking.kind": "pgs", "masking.ratio": 0.0, "pgs.min_mask_ratio": 0.5,
                            "pgs.max_mask_ratio": 0.5}),
    "pgs0.3": MethodRecipe("CLIP-PGS0.3: edge/similarity-guided patch dropping, 30-50 % of patches",
                           {"masking.kind": "pgs", "masking.ratio": 0.0, "pgs.min_mask_ratio": 0.3,
                            "pgs.max_mask_ratio": 0.5}),
}


def build_method_config(method: str, base: TrainConfig | None = None) -> TrainConfig:
    """The configuration of a named method; unknown names list the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    config = apply_overrides(base or TrainConfig(), METHODS[method].overrides)
    return apply_overrides(config, {"method": method})
