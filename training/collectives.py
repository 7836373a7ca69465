"""Collectives with gradients, on the synchronous c10d API.

`all_gather_with_grad` is what contrastive losses need: every worker's rows concatenated in
rank order, and in backward each worker receives the sum, over all workers, of the gradient
that reached its own slice (a reduce-scatter of the sum; torch.distributed.nn's deprecated
`all_gather` had the same contract). It is written here on plain `dist.all_gather` /
`dist.all_reduce` / `dist.reduce_scatter_tensor` rather than on torch's functional
collectives: with those on gloo, two of our 2-worker CPU demo runs lost a worker to heap
corruption (SIGSEGV in malloc, "unaligned tcache chunk") while its peer waited in
`all_gather_into_tensor_backward`. The cause was not isolated; the synchronous ops are the
ones DDP itself relies on."""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        ctx.rank = rank
        ctx.rows = features.shape[0]
        gathered = [torch.empty_like(features) for _ in range(world_size)]
        dist.all_gather(gathered, features.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        grad_output = grad_output.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            grad = grad_output.new_empty((ctx.rows, *grad_output.shape[1:]))
            dist.reduce_scatter_tensor(grad, grad_output, op=dist.ReduceOp.SUM)
            return grad
        summed = grad_output.clone()  # gloo: the sum of every copy, then this worker's slice
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each of W workers -> (W·B, ...) in rank order, differentiable; equal batch
    sizes on every worker (as the data stage guarantees)."""
    return _AllGatherWithGrad.apply(features)


def sum_over_workers(keys: list[str], values: list, device: torch.device) -> list[float]:
    """Each value summed over every worker (one all-reduce in float64). The workers must name the
    same keys in the same order: checked first, so that a mismatch is an error naming them,
    not a collective of two sizes that hangs."""
    fingerprint = torch.tensor([len(keys), zlib.crc32(",".join(keys).encode())], dtype=torch.int64, device=device)
    seen = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(seen, fingerprint)
    if any(not torch.equal(s, fingerprint) for s in seen):
        raise RuntimeError(f"workers log different metrics; worker {dist.get_rank()} has {keys}")
    totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return totals.tolist()


def gather_strided(local: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, ...) rows of a set split round-robin over the workers (worker r holds rows
    r, r + W, ..., padded to one length k on every worker) -> all n rows in order on every
    worker. Without a process group `local` is already the whole set."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return interleave_shares(parts, n)


def interleave_shares(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Worker shares (k, ...) in rank order -> the n rows in set order: row p·W + r is worker
    r's p-th; the padding rows fall past n."""
    stacked = torch.stack(parts, dim=1)  # (k, W, ...)
    return stacked.reshape(-1, *parts[0].shape[1:])[:n]
