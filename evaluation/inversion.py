"""Modality inversion ("Cross the Gap", docs/methods/inversion.md §1-2): features of one modality found by
optimising inputs of the *other* tower, which stays frozen.

- OTI (image -> text feature): k pseudo-token embeddings at the placeholders of
  "a photo of £" replace those token-embedding rows *before* the positional embeddings are
  added; the EOT state is projected; AdamW (lr 0.02, wd 0.01, default betas) for 150 steps
  against 1 − cos with the image feature.
- OVI (text -> image feature): k pseudo-patch embeddings (conv1-output space) repeated by
  nearest neighbour along the raster token order to fill the L patch slots, then the frozen
  ViT with its own class and positional embeddings (ln_pre, transformer, ln_post,
  projection); 1000 steps.

Many queries are inverted at once: the loss is the *sum* of per-query losses and AdamW is
element-wise, so each query's trajectory does not depend on the others; each query's
initialisation N(0, 0.02²) is drawn from (seed, query identity). The features therefore do
not depend on how queries are split into batches. The towers are frozen (no gradient, eval
mode) and never copied. Defined on the sphere (unit features, cosine), as in the paper.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from evaluation.cache import settings_key
from training.towers import class_tokens, num_class_tokens, project_pooled

PLACEHOLDER = "£"  # one token in CLIP's BPE (id 1950), as in the paper's code
INIT_STD = 0.02


@dataclass(frozen=True)
class InversionConfig:
    kind: str = "oti"  # "oti" (images -> text features) | "ovi" (texts -> image features)
    k: int = 1  # pseudo-tokens (OTI) / pseudo-patches (OVI); the paper: 1 for B/32, 4 for L/14 OVI
    steps: int = 0  # 0: the paper's 150 (OTI) / 1000 (OVI)
    lr: float = 0.02
    weight_decay: float = 0.01
    template: str = "a photo of {}"  # OTI: the placeholders fill {}
    seed: int = 0

    @property
    def num_steps(self) -> int:
        return self.steps or {"oti": 150, "ovi": 1000}[self.kind]


# Embedding requests for inverted features: "<kind>-<digest of the settings>" -> settings. The
# request string is the embedding cache's modality key, so every setting that changes the
# features (k, steps, lr, weight decay, template, seed) changes the key.
INVERTS = {"oti": "image", "ovi": "text"}  # what each inversion reads
_REQUESTS: dict[str, InversionConfig] = {}


def inversion_request(config: InversionConfig) -> str:
    key = settings_key(config.kind, config)
    _REQUESTS[key] = config
    return key


def requested_inversion(modality: str) -> InversionConfig | None:
    """The settings behind an inversion request made in this process (None: not one)."""
    return _REQUESTS.get(modality)


def inversion_from_options(kind: str, options: dict) -> InversionConfig:
    """A suite entry's {"query": kind, "inversion": {k, steps, lr, weight_decay, template, seed}}."""
    return InversionConfig(kind=kind, **options.get("inversion", {}))


def check_inversion(config: InversionConfig, topology_kind: str, visual: nn.Module | None = None) -> None:
    if config.kind not in ("oti", "ovi"):
        raise ValueError(f"unknown inversion {config.kind!r}; known: oti, ovi")
    if config.k < 1 or config.steps < 0:
        raise ValueError(f"inversion needs k >= 1 and steps >= 0, got k={config.k}, steps={config.steps}")
    if topology_kind != "sphere":
        raise ValueError(
            f"modality inversion is defined on the sphere (cosine of unit features); this "
            f"checkpoint's topology is {topology_kind}"
        )
    if config.kind == "ovi" and visual is not None and not hasattr(visual, "transformer"):
        raise ValueError(
            f"OVI needs a ViT image tower (pseudo-patches replace its patch embeddings), not {type(visual).__name__}"
        )


def query_generator(seed: int, identity: str) -> torch.Generator:
    """A generator seeded from (seed, query identity) alone."""
    digest = hashlib.sha256(f"{seed}\0{identity}".encode("utf-8")).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def initial_pseudo_inputs(identities: list[str], k: int, width: int, seed: int) -> torch.Tensor:
    """(Q, k, w) N(0, 0.02²) draws, each query's from its own generator (on the CPU, so the
    draw does not depend on the device either)."""
    return torch.stack([torch.randn(k, width, generator=query_generator(seed, i)) * INIT_STD for i in identities])


def nearest_repeat(pseudo: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(Q, k, w) -> (Q, L, w): slot i takes pseudo-input ⌊i·k / L⌋ (k runs in raster order)."""
    index = torch.arange(num_slots, device=pseudo.device) * pseudo.shape[1] // num_slots
    return pseudo[:, index]


@contextlib.contextmanager
def frozen(module: nn.Module):
    """No gradient into the module's weights and eval mode for the block; restored after."""
    flags = [p.requires_grad for p in module.parameters()]
    training = module.training
    module.eval().requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(training)


class PseudoTokenText:
    """f_T(template with k placeholder embeddings replaced) for an open_clip CLIP text tower."""

    def __init__(self, tower: nn.Module, tokenizer, config: InversionConfig):
        self.tower = tower
        prompt = config.template.format(" ".join([PLACEHOLDER] * config.k))
        tokens = tokenizer([prompt])  # (1, L)
        placeholder = tokenizer([PLACEHOLDER])[0, 1].item()
        self.positions = (tokens[0] == placeholder).nonzero().flatten()
        if len(self.positions) != config.k:
            raise ValueError(
                f"the OTI template {config.template!r} must hold exactly one {{}} (got "
                f"{len(self.positions)} placeholder tokens for k={config.k})"
            )
        self.tokens = tokens.to(tower.positional_embedding.device)
        self.eot = int(self.tokens[0].argmax())

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    def __call__(self, pseudo: torch.Tensor) -> torch.Tensor:
        """(Q, k, w) pseudo-token embeddings -> (Q, d) projected EOT states."""
        tower = self.tower
        cast = tower.transformer.get_cast_dtype()
        x = tower.token_embedding(self.tokens).to(cast).expand(len(pseudo), -1, -1).clone()
        x[:, self.positions] = pseudo.to(cast)  # the rows are replaced before positions are added
        x = x + tower.positional_embedding.to(cast)
        x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask))
        return x[:, self.eot] @ tower.text_projection


class PseudoPatchImage:
    """f_I(nearest-repeated pseudo-patches) for an open_clip ViT: the tower's own class and
    positional embeddings, ln_pre, transformer, pooling, projection."""

    def __init__(self, visual: nn.Module):
        self.visual = visual
        self.num_patches = visual.positional_embedding.shape[0] - num_class_tokens(visual)

    @property
    def width(self) -> int:
        return self.visual.conv1.out_channels

    def __call__(self, pseudo: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        slots = nearest_repeat(pseudo, self.num_patches).to(visual.positional_embedding.dtype)
        x = torch.cat([class_tokens(visual, len(pseudo), slots.dtype), slots], dim=1)
        x = visual.ln_pre(visual.patch_dropout(x + visual.positional_embedding.to(slots.dtype)))
        pooled, _ = visual._pool(visual.transformer(x))
        return project_pooled(visual, pooled)


def invert(forward, targets: torch.Tensor, init: torch.Tensor, config: InversionConfig) -> tuple[torch.Tensor, list]:
    """(unit inverted features (Q, d), loss per step) for unit `targets` (Q, d): AdamW on the
    pseudo-inputs only, the sum over queries of 1 − cos; bf16 autocast on CUDA."""
    with torch.enable_grad():  # encoders run under no_grad
        return optimise(forward, targets, init, config)


def optimise(forward, targets, init, config):
    pseudo = init.to(targets.device).clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([pseudo], lr=config.lr, weight_decay=config.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=targets.device.type == "cuda")
    targets, losses = F.normalize(targets.float(), dim=-1), []
    for _ in range(config.num_steps):
        with autocast:
            features = forward(pseudo)
        loss = (1 - (F.normalize(features.float(), dim=-1) * targets).sum(dim=-1)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    with torch.no_grad(), autocast:
        features = forward(pseudo)
    return F.normalize(features.float(), dim=-1), [float(v) for v in losses]


def oti_features(
    tower: nn.Module, tokenizer, image_features: torch.Tensor, identities: list[str], config: InversionConfig
) -> torch.Tensor:
    """OTI: (Q, d) unit text-tower features whose cosine with each image feature was maximised."""
    with frozen(tower):
        text = PseudoTokenText(tower, tokenizer, config)
        init = initial_pseudo_inputs(identities, config.k, text.width, config.seed)
        return invert(text, image_features, init, config)[0]


def ovi_features(
    tower: nn.Module, text_features: torch.Tensor, identities: list[str], config: InversionConfig
) -> torch.Tensor:
    """OVI: (Q, d) unit image-tower features whose cosine with each text feature was maximised."""
    with frozen(tower):
        image = PseudoPatchImage(tower.visual)
        init = initial_pseudo_inputs(identities, config.k, image.width, config.seed)
        return invert(image, text_features, init, config)[0]
