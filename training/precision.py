"""The step's numeric precision, `run.precision`:

* `fp32`: float32 weights and arithmetic (the oblique paper trained so);
* `amp_bf16`: float32 weights, the forward under bfloat16 autocast (the default on CUDA);
* `bf16`: bfloat16 weights and arithmetic, with float32 master weights in the optimiser
  (`MasterWeights`): at the 1e-6 learning rates of the fine-tuning recipes a bfloat16 weight
  (8 bits of mantissa) would absorb no update at all;
* `auto`: `amp_bf16` on CUDA, `fp32` elsewhere.

Under `bf16` the float32 model stays the canonical one: the optimiser, the checkpoints,
evaluation and the open_clip export all see float32 weights, so a resume is exact; the
forward and backward run on a bfloat16 copy whose gradients are moved to the float32
parameters before clipping and the update, and which takes the updated weights back after.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "amp_bf16", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown run.precision={precision!r}; known: {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    check_precision(precision)
    if precision == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return precision


class MasterWeights:
    """A bfloat16 compute copy of a float32 model, kept in step with it."""

    def __init__(self, master: nn.Module):
        self.master = master
        self.compute = copy.deepcopy(master).to(torch.bfloat16)
        named = dict(self.compute.named_parameters())
        self.pairs = [(p, named[n]) for n, p in master.named_parameters() if p.requires_grad]

    def grads_to_master(self) -> None:
        """The compute copy's gradients, as float32, into the master parameters' .grad."""
        for master, compute in self.pairs:
            master.grad = None if compute.grad is None else compute.grad.float()
            compute.grad = None

    @torch.no_grad()
    def master_to_compute(self) -> None:
        for master, compute in self.pairs:
            compute.copy_(master)


def upcast_outputs(outputs: dict) -> dict:
    """The model's floating outputs as float32 (the loss of a bfloat16 model in float32)."""
    return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
