"""CIBR, cross-modal information bottleneck regularisation (docs/methods/cibr.md §2):

    L = L_base + λ·R,   R = [Â(Z_v; X_v, X_t) − Ĉ(Z_v; X_t)] + [Â(Z_t; X_t, X_v) − Ĉ(Z_t; X_v)],

each bracket a conditional MI by the chain rule (training/methods/cibr/mutual_information.py), X the
features of a frozen copy of the starting towers, Z the trained embeddings with Gaussian
channel noise. Two auxiliary parts (training/auxiliary.py): the frozen reference towers, and
the four estimators with their own optimiser, updated once per step before the encoders'
backward (alternating max-min).

Across workers the estimators see the gathered global batch, with the noise and the
derangement drawn from (seed, step): every rank then takes the same estimator step on the same
inputs, and the encoders' R is the global batch's, as one process would compute it. Averaging
per-rank gradients instead would estimate another quantity: the DV bound's log-mean-exp over
the marginal samples does not split into a sum over ranks, and each rank would only shuffle
its own rows.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from training.auxiliary import AuxiliaryPart, freeze, without_grad
from training.config import CibrConfig
from training.methods.clip.loss import gather_features
from training.methods.cibr.mutual_information import ESTIMATOR_KINDS, ConditionalMI, derangement
from training.towers import tower_dtype


class ReferenceTowers(nn.Module):
    """X_v, X_t of the raw inputs: a frozen copy of the starting open_clip towers, read before
    their final projections (a ViT's class token after ln_post, the text EOT state after
    ln_final). A ModifiedResNet's attention pool ends in its projection: its output is used."""

    def __init__(self, tower: nn.Module):
        super().__init__()
        tower = copy.deepcopy(tower)
        visual = tower.visual
        text_projection = tower.text_projection
        if getattr(visual, "proj", None) is not None:
            self.image_dim = visual.proj.shape[0]
            visual.proj = None
        else:
            self.image_dim = visual.output_dim
        self.text_dim = (
            text_projection.in_features if isinstance(text_projection, nn.Linear) else text_projection.shape[0]
        )
        tower.text_projection = None
        self.tower = freeze(tower)

    def train(self, mode: bool = True) -> ReferenceTowers:
        return super().train(False)  # frozen: eval mode whatever the caller switches

    @torch.no_grad()
    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 weights; the step's precision is the loop's autocast around the parts' update
        # (bfloat16 under run.precision amp_bf16 and bf16)
        return self.tower.encode_image(images.to(tower_dtype(self.tower.visual))), self.tower.encode_text(texts)


INFONCE_TERMS = ("contrastive", "long")  # CLIP's loss; Long-CLIP's on the long captions


def cibr_weight(step: int, cfg: CibrConfig) -> float:
    """λ of a step (0-based): 0 during the estimators' warm-up, then a linear ramp."""
    if step < cfg.warmup_steps:
        return 0.0
    if cfg.ramp_steps <= 0:
        return cfg.lambda_
    return cfg.lambda_ * min(1.0, (step - cfg.warmup_steps + 1) / cfg.ramp_steps)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The same draws on every rank (the noise and the derangement of the global batch), on
    the device, so that drawing them never waits on it."""
    state = np.random.SeedSequence([seed, step, 0xC1B8]).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) >> 1)


class CibrObjective(nn.Module):
    """The base objective's terms plus {"cibr": λ·R}; R's four estimates, λ and the InfoNCE
    value log B − L_base go to the step's diagnostics (`cibr/...`)."""

    def __init__(
        self,
        base: nn.Module,
        reference: ReferenceTowers,
        z_dim: int,
        cfg: CibrConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        super().__init__()
        if cfg.estimator not in ESTIMATOR_KINDS:
            raise ValueError(f"unknown cibr.estimator {cfg.estimator!r}; known: {', '.join(ESTIMATOR_KINDS)}")
        self.base = base
        self.reference = reference
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        x_v = reference.image_dim
        x_t = reference.text_dim
        self.estimators = nn.ModuleDict(
            {
                "image": ConditionalMI(cfg.estimator, z_dim, x_v, x_t, cfg.hidden, cfg.ema_rate),  # I(Z_v; X_v | X_t)
                "text": ConditionalMI(cfg.estimator, z_dim, x_t, x_v, cfg.hidden, cfg.ema_rate),
            }
        )  # I(Z_t; X_t | X_v)
        self.optimizer: torch.optim.Optimizer | None = None  # the estimators', made by `attach`
        self.parts: list[AuxiliaryPart] = []

    def attach(self, device: torch.device) -> CibrObjective:
        """Move to the device and give the estimators their optimiser (Adam, no weight decay)."""
        self.to(device)
        self.optimizer = torch.optim.Adam(
            self.estimators.parameters(), lr=self.cfg.estimator_lr, betas=self.cfg.estimator_betas
        )
        self.parts = [
            AuxiliaryPart("reference", self.reference),
            AuxiliaryPart("estimators", self.estimators, self.optimizer, self.update_estimators),
        ]
        return self

    def auxiliary_parts(self) -> list[AuxiliaryPart]:
        return self.parts

    def step_inputs(self, outputs: dict) -> dict:
        """The step's global-batch Z (with grad), noisy Z̃, X and derangement, once per step."""
        if "cibr_inputs" not in outputs:
            inputs = outputs["inputs"]
            device = outputs["image_features"].device
            x_v, x_t = self.reference(inputs["images"], inputs["texts"])
            gather = lambda t, grad: gather_features(t, self.rank, self.world_size, grad, local_loss=not grad)  # noqa: E731
            z_v, z_t = (gather(outputs[k].float(), True) for k in ("image_features", "text_features"))
            generator = step_generator(self.seed, outputs["step"], device)
            noise = torch.randn((2, *z_v.shape), generator=generator, device=device) * self.cfg.noise_std
            outputs["cibr_inputs"] = {
                "z_v": z_v + noise[0],
                "z_t": z_t + noise[1],
                "batch": z_v.shape[0],
                "x_v": gather(x_v.float(), False),
                "x_t": gather(x_t.float(), False),
                "perm": derangement(z_v.shape[0], generator, device),
            }
        return outputs["cibr_inputs"]

    def estimate(self, z_v, z_t, x_v, x_t, perm):
        return self.estimators["image"](z_v, x_v, x_t, perm), self.estimators["text"](z_t, x_t, x_v, perm)

    def update_estimators(self, outputs: dict) -> dict:
        """The estimators' own step(s) on the detached inputs: each maximises its objective."""
        s = self.step_inputs(outputs)
        z_v = s["z_v"].detach()
        z_t = s["z_t"].detach()
        x_v = s["x_v"]
        x_t = s["x_t"]
        perm = s["perm"]
        repeats = self.cfg.warmup_estimator_steps if outputs["step"] < self.cfg.warmup_steps else 1
        with torch.autocast(device_type=z_v.device.type, enabled=False):
            for _ in range(repeats):
                self.estimators["image"].update_ema(z_v, x_v, x_t, perm)
                self.estimators["text"].update_ema(z_t, x_t, x_v, perm)
                image, text = self.estimate(z_v, z_t, x_v, x_t, perm)
                objective = sum(t.objective for t in (*image, *text))
                self.optimizer.zero_grad(set_to_none=True)
                (-objective).backward()
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # no estimator gradient outlives its own step
        return {}

    def forward(self, outputs: dict) -> dict:
        terms = self.base(outputs)
        s = self.step_inputs(outputs)
        weight = cibr_weight(outputs["step"], self.cfg)
        with (
            without_grad(self.estimators),
            torch.autocast(device_type=s["z_v"].device.type, enabled=False),
            torch.set_grad_enabled(weight != 0),
        ):  # λ = 0: logged, no graph, no gather backward
            (a_v, c_v), (a_t, c_t) = self.estimate(s["z_v"], s["z_t"], s["x_v"], s["x_t"], s["perm"])
        regularizer = (a_v.value - c_v.value) + (a_t.value - c_t.value)
        diagnostics = {
            "cibr/A_v": a_v.value.detach(),
            "cibr/C_v": c_v.value.detach(),
            "cibr/A_t": a_t.value.detach(),
            "cibr/C_t": c_t.value.detach(),
            "cibr/R": regularizer.detach(),
            "cibr/lambda": weight,
        }
        infonce = [terms[k] for k in INFONCE_TERMS if k in terms]  # the symmetric InfoNCE of the base
        if infonce:
            diagnostics["cibr/infonce"] = math.log(s["batch"]) - infonce[0].detach()
        outputs.setdefault("diagnostics", {}).update(diagnostics)
        return {**terms, "cibr": weight * regularizer}
