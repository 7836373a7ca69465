"""The trained model: an open_clip tower pair plus the parts a method adds around it
(patch selection in the vision tower, long-text positions, SmartCLIP's mask network, the
multi-[CLS] towers of a topology), returning a dict of named outputs. Every embedding is the
topology's (`embed_image` / `embed_text`, training/methods/topology/spaces.py)."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from training.config import (
    MaskingConfig,
    ModelConfig,
    PGSConfig,
    SmartClipConfig,
    Temperature,
    TopologyConfig,
    TrainConfig,
    temperature_of,
)
from training.methods.longclip.positions import apply_long_text
from training.methods.recipes import check_combination, resolve_auto_fields
from training.methods.flip import RandomPatchDrop
from training.methods.pgs import PGSSelector, check_supported_tower, encode_image_with_selection, summarize_selection
from training.methods.smartclip.mask_network import MaskNetwork, encode_text_with_states
from training.methods.topology.multi_token import convert_to_multi_token
from training.pretrained import load_pretrained_tower
from training.methods.topology.spaces import Sphere, build_topology
from training.towers import SampleGeometry, num_class_tokens, pooled_class_states, tower_dtype

# Patch selection by `masking.kind` ("none": every token). A hook selector (FLIP) runs in
# open_clip's patch-dropout hook and sees only the tokens; a token selector (PGS) also reads the
# images and edge scores, so the model runs the vision tower around it.
HOOK_SELECTORS = {"random": RandomPatchDrop}
TOKEN_SELECTORS = {"pgs": PGSSelector}
SELECTION_KINDS = ("none", *HOOK_SELECTORS, *TOKEN_SELECTORS)


class ContrastiveModel(nn.Module):
    """Wraps an open_clip CLIP; `forward` returns the topology's embeddings and the logit
    scale, the embeddings of a second (short) caption when given, with a mask network each
    caption's binary mask over embedding dimensions plus its mean density, and with a token
    selector (PGS) its `masking/...` statistics."""

    def __init__(
        self,
        tower: nn.Module,
        patch_selector: nn.Module | None,
        max_logit_scale: float,
        mask_network: nn.Module | None = None,
        token_selector: PGSSelector | None = None,
        topology: Sphere | None = None,
    ):
        super().__init__()
        self.tower = tower
        self.topology = topology or Sphere(tower.text_projection.shape[1])
        self.max_logit_scale = max_logit_scale
        self.mask_network = mask_network  # outside `tower`: the open_clip export stays plain CLIP
        if patch_selector is not None:
            check_patch_tower(tower.visual, "FLIP's patch dropout (masking.kind=random)")
            tower.visual.patch_dropout = patch_selector  # open_clip's hook after pos. embed.
        if token_selector is not None:
            check_supported_tower(tower.visual)
        self.token_selector = token_selector

    @property
    def patch_selector(self) -> nn.Module:
        return self.tower.visual.patch_dropout

    def embed_image(self, images: torch.Tensor) -> torch.Tensor:
        """The topology's image embedding of every patch (no selection); float32 images are
        cast to the tower's weights (bfloat16 under run.precision=bf16) here, so that what reads
        the pixels themselves (PGS's selection) reads them unrounded."""
        return self.topology.embed(self.tower.encode_image(images.to(tower_dtype(self.tower.visual))))

    def embed_text(self, texts: torch.Tensor) -> torch.Tensor:
        return self.topology.embed(self.tower.encode_text(texts))

    def image_class_states(self, images: torch.Tensor) -> torch.Tensor:
        """(B, c·w): the c class-token states after ln_post, before the projection, concatenated
        (what a linear probe reads with the projection head removed, docs/methods/topology.md §6)."""
        check_patch_tower(self.tower.visual, "class-token features")
        return pooled_class_states(self.tower.visual, images)

    def encode_text(self, texts: torch.Tensor) -> dict:
        if self.mask_network is None:
            return {"text_features": self.embed_text(texts)}
        features, states = encode_text_with_states(self.tower, texts)
        masks, _ = self.mask_network(states, texts)  # (B, d) 0/1 forward values
        return {"text_features": features, "text_masks": masks, "diagnostics": {"mask_density": masks.detach().mean()}}

    def forward(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        short_texts: torch.Tensor | None = None,
        edge_scores: torch.Tensor | None = None,
        epoch_fraction: float = 0.0,
    ) -> dict:
        """edge_scores (B, L) and epoch_fraction (epoch / epochs) feed a token selector."""
        image_features, selection_stats = self.encode_image_for_training(images, edge_scores, epoch_fraction)
        outputs = {
            "image_features": image_features,
            **self.encode_text(texts),
            "logit_scale": self.tower.logit_scale.exp(),
            **selection_stats,
        }
        if short_texts is not None:
            outputs["short_text_features"] = self.embed_text(short_texts)
        return outputs

    def encode_image_for_training(self, images, edge_scores, epoch_fraction) -> tuple[torch.Tensor, dict]:
        if self.token_selector is None or not self.training:  # evaluation sees every token
            return self.embed_image(images), {}
        pooled, selection = encode_image_with_selection(
            self.tower.visual, self.token_selector, images, edge_scores, epoch_fraction
        )
        visual = self.tower.visual
        num_patches = visual.positional_embedding.shape[0] - num_class_tokens(visual)
        return self.topology.embed(pooled), summarize_selection(selection, num_patches)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Clip the temperature at 1 / max_logit_scale (open_clip clamps after each step)."""
        self.tower.logit_scale.clamp_(0, torch.log(torch.tensor(self.max_logit_scale)).item())


def check_patch_tower(visual: nn.Module, feature: str) -> None:
    """Patch selection and class-token states exist only in a ViT image tower; a
    convolutional one (open_clip's ModifiedResNet) is refused by name."""
    if not hasattr(visual, "patch_dropout"):
        raise ValueError(f"{feature} needs a VisionTransformer image tower, not {type(visual).__name__}")


def build_patch_selector(masking: MaskingConfig, num_prefix_tokens: int = 1) -> nn.Module | None:
    """The patch-dropout hook's selector; the first `num_prefix_tokens` (class tokens) stay."""
    if masking.kind not in SELECTION_KINDS:
        raise ValueError(f"unknown patch selection {masking.kind!r}; known: {sorted(SELECTION_KINDS)}")
    selector = HOOK_SELECTORS.get(masking.kind)
    return None if selector is None else selector(masking.ratio, num_prefix_tokens)


def build_mask_network(tower: nn.Module, smartclip: SmartClipConfig) -> MaskNetwork:
    """Shaped like one block of the text tower (its width, heads and activation)."""
    block = tower.transformer.resblocks[0]
    return MaskNetwork(
        tower.transformer.width,
        block.attn.num_heads,
        tower.text_projection.shape[1],
        smartclip.mask_init_bias,
        act_layer=type(block.mlp.gelu),
    )


def build_token_selector(masking: MaskingConfig, pgs: PGSConfig, visual: nn.Module) -> PGSSelector | None:
    if masking.kind not in TOKEN_SELECTORS:
        return None
    check_supported_tower(visual)
    patch_size = _first(visual.patch_size)
    if masking.ratio != 0.0:
        raise ValueError(
            "CLIP-PGS takes its mask ratios from pgs.min_mask_ratio / pgs.max_mask_ratio; "
            f"leave masking.ratio at 0 (got {masking.ratio})"
        )
    return TOKEN_SELECTORS[masking.kind](pgs, patch_size)


def resolve_text_route(topology: TopologyConfig, model: ModelConfig) -> str:
    if topology.text_tokens != "auto":
        return topology.text_tokens
    return "append" if model.pretrained else "prepend"


def apply_topology(tower: nn.Module, topology_config: TopologyConfig, model: ModelConfig) -> Sphere:
    """The topology object; for multi, the towers are converted to m [CLS] tokens first."""
    topology = build_topology(topology_config, tower.text_projection.shape[1])
    if topology.kind == "multi":
        convert_to_multi_token(tower, topology.m, topology.n, resolve_text_route(topology_config, model))
    return topology


# The final projection of each tower, by open_clip parameter name: a ViT's `visual.proj`, a
# ModifiedResNet's attention-pool output projection, the text tower's `text_projection`
# (a matrix, or a Linear with proj_type "linear").
PROJECTION_PARAMETERS = (
    "visual.proj",
    "visual.attnpool.c_proj.weight",
    "visual.attnpool.c_proj.bias",
    "text_projection",
    "text_projection.weight",
    "text_projection.bias",
)


def freeze_all_but_projections(tower: nn.Module) -> list[str]:
    """requires_grad only on the two final projections (Cross the Gap §5.6); returns their
    names. The temperature is set apart, by `set_temperature`."""
    kept = [name for name, _ in tower.named_parameters() if name in PROJECTION_PARAMETERS]
    if not any(n.startswith("visual.") for n in kept) or not any(n.startswith("text_") for n in kept):
        raise ValueError(
            f"model.trainable=projections: no final projection found in both towers of "
            f"{type(tower.visual).__name__} (found {kept or 'none'})"
        )
    for name, parameter in tower.named_parameters():
        parameter.requires_grad_(name in kept)
    for module in tower.modules():  # a ResNet's running statistics stay as they were too
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0
    return kept


def set_temperature(tower: nn.Module, model: ModelConfig, temperature: Temperature) -> None:
    if model.pretrained is None or temperature.reset:
        with torch.no_grad():
            tower.logit_scale.fill_(temperature.init_logit_scale)
    tower.logit_scale.requires_grad_(temperature.learn)


def build_model(
    model: ModelConfig,
    masking: MaskingConfig,
    temperature: Temperature,
    smartclip: SmartClipConfig | None = None,
    *,
    pgs: PGSConfig = PGSConfig(),
    topology: TopologyConfig = TopologyConfig(),
) -> ContrastiveModel:
    """The towers (from `model.pretrained` if set), long-text positions, the topology (m
    [CLS] tokens for multi; its logit-scale cap comes in `temperature`, see `temperature_of`),
    patch selection (FLIP in open_clip's hook, PGS around the vision tower; both keep every
    class token), and a mask network when `smartclip` is given."""
    tower = load_pretrained_tower(model.arch, model.pretrained)
    apply_long_text(tower, model.text_positions_kept, model.text_stretch_factor)
    space = apply_topology(tower, topology, model)
    if model.trainable == "projections":
        freeze_all_but_projections(tower)
    set_temperature(tower, model, temperature)
    mask_network = None if smartclip is None else build_mask_network(tower, smartclip)
    return ContrastiveModel(
        tower,
        build_patch_selector(masking, num_class_tokens(tower.visual)),
        temperature.max_logit_scale,
        mask_network,
        build_token_selector(masking, pgs, tower.visual),
        space,
    )


def build_training_model(config: TrainConfig, with_weights: bool = True) -> ContrastiveModel:
    """The model a training config describes (the mask network only for SmartCLIP's loss);
    `with_weights=False`: its architecture only, without fetching `model.pretrained`."""
    check_combination(config)
    config = resolve_auto_fields(config)  # what depends on `pretrained` is fixed before it is dropped
    smartclip = config.smartclip if config.loss.kind == "smartclip" else None
    model = config.model if with_weights else dataclasses.replace(config.model, pretrained=None)
    built = build_model(
        model,
        config.masking,
        temperature_of(config.loss, config.topology),
        smartclip,
        pgs=config.pgs,
        topology=config.topology,
    )
    built.tower.set_grad_checkpointing(config.run.grad_checkpointing)
    return built


def sample_geometry(model: ContrastiveModel, arch: str) -> SampleGeometry:
    """What the data stage and evaluation prepare samples for, read from the built towers:
    image and patch size, and the text tower's own context (Long-CLIP's stretched positions
    included), with the arch's tokenizer."""
    return SampleGeometry(arch, *tower_geometry(model), int(model.tower.context_length))


def tower_geometry(model: ContrastiveModel) -> tuple[int, int]:
    """(image size, patch size) of the vision tower."""
    visual = model.tower.visual
    # A convolutional tower (open_clip's ModifiedResNet) has no patches: its "patch" for the
    # data stage (edge scores per patch) is the whole image.
    image_size = int(_first(visual.image_size))
    return image_size, int(_first(getattr(visual, "patch_size", image_size)))


def _first(size: int | tuple[int, ...]) -> int:
    return size[0] if isinstance(size, (tuple, list)) else size
