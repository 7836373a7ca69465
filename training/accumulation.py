"""Contrastive-correct gradient accumulation (GradCache, Gao et al. 2021): a per-worker batch
of B·k from k micro-batches whose gradients equal the full batch's for every parameter.

A contrastive loss couples every sample with every other, so summing k per-micro-batch
losses is a different (weaker) objective. Instead:
1. forward each micro-batch without grad and concatenate the outputs (B·k rows);
2. make the differentiable outputs leaves, run the auxiliary parts' updates and the objective
   on all B·k rows once, backward: the loss's gradient reaches the leaves (and, through the
   objective's gather, every worker's rows);
3. forward each micro-batch again with grad and back-propagate its slice of the leaves'
   gradients (the surrogate <output, d loss / d output>), DDP syncing on the last only.
Per-sample outputs (a leading batch dimension) are sliced per micro-batch; global outputs
(0-dim, the logit scale) enter the surrogate of the last micro-batch only, so the
temperature's gradient is counted once, not k times. Each micro-batch's random draws (FLIP's
masks) are reseeded from (seed, step, rank, micro-batch) before both of its forwards, so the
recompute draws what the cached forward drew. PGS selects within each micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from training.checkpoint import unwrap

SUMMARY_PREFIXES = ("masking/",)  # statistics averaged over micro-batches, never differentiated


def split_inputs(inputs: dict, k: int) -> list[dict]:
    """The step's model inputs (each a (B·k, ...) tensor or None) -> k micro-batches."""
    rows = next(v.shape[0] for v in inputs.values() if torch.is_tensor(v))
    if rows % k:
        raise ValueError(f"run.accum_freq={k} does not divide the per-worker batch of {rows}")
    return [{name: None if v is None else v.chunk(k)[j] for name, v in inputs.items()} for j in range(k)]


def merge_outputs(micro_outputs: list[dict]) -> tuple[dict, dict]:
    """(outputs over all B·k rows, their differentiable leaves by key). Per-sample tensors are
    concatenated, global ones (0-dim) must agree across micro-batches, summaries averaged."""
    merged = {}
    leaves = {}
    for key, first in micro_outputs[0].items():
        values = [out[key] for out in micro_outputs]
        if key == "diagnostics":
            merged[key] = {name: torch.stack([v[name] for v in values]).mean() for name in first}
        elif key.startswith(SUMMARY_PREFIXES) or not torch.is_tensor(first):
            merged[key] = torch.stack(values).float().mean() if torch.is_tensor(first) else first
        else:
            joined = first if first.ndim == 0 else torch.cat(values)
            if first.ndim == 0 and not all(torch.equal(v, first) for v in values):
                raise RuntimeError(f"accumulation: the global output {key!r} differs across micro-batches")
            leaves[key] = merged[key] = joined.detach().requires_grad_(joined.is_floating_point())
    return merged, {k: v for k, v in leaves.items() if v.requires_grad}


def surrogate(outputs: dict, leaves: dict, j: int, k: int) -> torch.Tensor:
    """<output_j, grad_j> over the differentiable outputs of micro-batch j (global outputs on
    the last micro-batch only); its gradient w.r.t. the parameters is the loss's."""
    total = None
    for key, leaf in leaves.items():
        if leaf.grad is None:
            continue
        value = outputs[key]
        if leaf.ndim == 0:
            term = value * leaf.grad if j == k - 1 else value * 0.0
        else:
            term = (value.float() * leaf.grad.chunk(k)[j]).sum()
        total = term if total is None else total + term
    if total is None:
        raise RuntimeError("accumulation: the objective's loss depends on no model output")
    return total


@contextlib.contextmanager
def gradient_sync(model, enabled: bool):
    """Reduce gradients across workers in this backward only if `enabled` (the last
    micro-batch): DDP's no_sync, FSDP2's set_requires_gradient_sync."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def accumulate_backward(
    model,
    objective,
    update_parts: Callable[[dict], dict],
    inputs: dict,
    k: int,
    forward: Callable[[object, dict], dict],
    reseed: Callable[[int], None],
    extras: dict,
    autocast,
) -> tuple[dict, torch.Tensor, dict, dict]:
    """(loss terms, total loss, merged outputs, the parts' metrics) of one step whose gradients
    now sit in the model's parameters. `forward(module, micro_inputs)` runs the model;
    `update_parts(outputs)` the objective's auxiliary parts' own step, once on all B·k rows;
    `reseed(j)` reseeds its draws for micro-batch j; `extras` joins the outputs (inputs, step)."""
    micro = split_inputs(inputs, k)
    with torch.no_grad(), autocast():
        cached = []
        for j, micro_inputs in enumerate(micro):
            reseed(j)
            cached.append(forward(unwrap(model), micro_inputs))
    outputs, leaves = merge_outputs(cached)
    outputs.update(extras)
    with autocast():
        part_metrics = update_parts(outputs)
        terms = objective(outputs)
    loss = sum(terms.values())
    loss.backward()
    for j, micro_inputs in enumerate(micro):
        with gradient_sync(model, j == k - 1):
            reseed(j)
            with autocast():
                again = forward(model, micro_inputs)
            surrogate(again, leaves, j, k).backward()
    return terms, loss, outputs, part_metrics
