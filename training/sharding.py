"""`run.sharding=fsdp`: PyTorch FSDP2 (`fully_shard`) instead of DDP, for towers whose
weights, gradients and AdamW moments do not fit one device many times over.

Every transformer block of both towers is its own FSDP unit (its parameters are gathered
just before it runs and freed after), the rest of the model is the root unit; each rank keeps
1/world of every unit's parameters, gradients and optimiser state. 0-dim parameters (the
logit scale) cannot be sharded: they stay replicated and their gradients are averaged here.
Under `run.precision=bf16` FSDP's own mixed precision takes the place of `MasterWeights`:
float32 sharded parameters in the optimiser, gathered as bfloat16 for compute, gradients
reduced in float32, outputs returned as float32 for the loss.

The checkpoint format does not change: the full (unsharded) model and an optimizer state in
the layout an unsharded AdamW writes, gathered from all ranks and written by rank 0, so
evaluation, the export and a resume under DDP read it as any other. A resume under FSDP
loads it into the unsharded model and optimizer as today, then shards both
(`shard_training_state`); the full optimizer state is held only for that moment.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from training.compilation import transformer_blocks

SHARDINGS = ("ddp", "fsdp")


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def local_parameter_count(model: nn.Module) -> int:
    """Parameters this rank holds: its shards, and the replicated ones whole."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


def replicated_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters FSDP leaves whole on every rank (0-dim: the logit scale)."""
    return [p for p in model.parameters() if p.ndim == 0]


def shard_model(model: nn.Module, device: torch.device, bf16: bool = False) -> nn.Module:
    """FSDP2 in place: each transformer block a unit, the root the rest."""
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_policy = root_policy = MixedPrecisionPolicy()
    if bf16:  # blocks hand bfloat16 on; the model's outputs (for the loss) are float32
        block_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        # images stay float32 into the model, which casts them for the towers (PGS reads pixels)
        root_policy = dataclasses.replace(block_policy, output_dtype=torch.float32, cast_forward_inputs=False)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=root_policy, ignored_params=set(replicated_parameters(model)))
    return model


def average_replicated_gradients(model: nn.Module) -> None:
    """All-reduce the gradients FSDP does not reduce (its ignored, replicated parameters)."""
    for param in replicated_parameters(model):
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over a mix of sharded (DTensor) and replicated gradients: the
    global L2 norm counts each shard once and each replicated gradient once."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = grads[0].device  # every sum stays there: no host synchronisation per step
    squares = [g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)]
    sharded = torch.stack(squares).sum() if squares else torch.zeros((), device=device)
    dist.all_reduce(sharded)
    whole = sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), torch.zeros((), device=device))
    norm = (sharded + whole).sqrt()
    factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(factor.to(g.dtype))
    return norm


def index_to_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[int, str]:
    """The optimizer state dict's parameter indices -> parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = itertools.chain.from_iterable(g["params"] for g in optimizer.param_groups)
    return {i: names[id(p)] for i, p in enumerate(params)}


def keyed_by_name(state: dict, names: dict[int, str]) -> dict:
    return {
        "state": {names[i]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def keyed_by_index(state: dict) -> dict:
    """A name-keyed optimizer state dict in the index layout of an unsharded optimizer."""
    order = list(itertools.chain.from_iterable(g["params"] for g in state["param_groups"]))
    index = {name: i for i, name in enumerate(order)}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def shard_training_state(
    model, optimizer, scheduler, build_optimizer, build_scheduler, device: torch.device, bf16: bool = False
):
    """(sharded model, its optimizer, its scheduler) carrying the unsharded ones' state;
    `build_optimizer(model)` / `build_scheduler(optimizer)` make the new ones as the run does."""
    names = index_to_name(model, optimizer)
    full = keyed_by_name(optimizer.state_dict(), names)
    schedule = scheduler.state_dict()
    shard_model(model, device, bf16)
    optimizer = build_optimizer(model)
    scheduler = build_scheduler(optimizer)  # first: it adds the groups' initial_lr, which the state has
    if full["state"]:  # a resumed run (a fresh one has no moments yet)
        set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(schedule)
    return model, optimizer, scheduler


def gather_full_state(model, optimizer) -> tuple[dict, dict]:
    """(full model state, full optimizer state in the unsharded index layout) on rank 0
    (empty on the others); every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    state = get_optimizer_state_dict(model, optimizer, options=options)
    return weights, (keyed_by_index(state) if dist.get_rank() == 0 else {})
