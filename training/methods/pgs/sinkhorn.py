"""CLIP-PGS's optimal-transport normalisation (OTN), S' = S + Sinkhorn(S), batched over the
images of a step. Both versions run a fixed number of iterations on the whole batch at once,
so they never read a device value back to the host inside the training step.

* `sinkhorn_plans`: entropic OT in POT's formulation (kernel exp(S / reg), uniform
  marginals), written with POT's backend-agnostic primitives; equals `ot.sinkhorn` run
  image by image. Used by the `paper` mode (docs/methods/pgs.md §5 step 4).
* `balance_similarity_reference`: the released code's loop on the raw similarity matrix
  (docs/methods/pgs.md §3 step 4), kept with its quirks for the `reference` mode.
"""

from __future__ import annotations

import os

import torch

REFERENCE_EPS = 1e-3  # stabiliser and tolerance of the released loop


def pot_backend(array):
    """POT's backend for `array`. POT is imported on first use, not with this module: its
    import takes 1.5-4 s (scikit-learn, networkx), paid by every process that imports the
    training code (the Ray Train worker, each Ray Data actor) even when PGS is off.

    POT imports every array library it finds when it is first imported, and JAX, when present,
    then preallocates 75 % of the GPU's memory (measured on an H200: ViT-B/16 at batch 512
    did not fit beside it). Only the torch backend is used here; a user's setting wins."""
    for backend in ("JAX", "CUPY", "TENSORFLOW"):
        os.environ.setdefault(f"POT_BACKEND_DISABLE_{backend}", "1")
    from ot.backend import get_backend

    return get_backend(array)


def sinkhorn_plans(similarity: torch.Tensor, reg: float, num_iters: int) -> torch.Tensor:
    """Entropic OT plans (B, n, m) for the cost -S (kernel exp(S / reg)) with uniform
    marginals, `num_iters` Sinkhorn-Knopp iterations in `ot.sinkhorn`'s update order.

    POT's own `ot.solve_batch` checks convergence with a host synchronisation every ten
    iterations; a fixed count on the same primitives keeps the step free of them.
    """
    if reg <= 0 or num_iters < 1:
        raise ValueError(f"Sinkhorn needs reg > 0 and num_iters >= 1, got {reg}, {num_iters}")
    nx = pot_backend(similarity)
    batch, n, m = similarity.shape
    kernel = nx.exp(similarity / reg)  # (B, n, m), POT's K = exp(-M / reg) with M = -S
    a = nx.ones((batch, n), type_as=similarity) / n
    b = nx.ones((batch, m), type_as=similarity) / m
    u = nx.ones((batch, n), type_as=similarity) / n
    for _ in range(num_iters):
        v = b / nx.einsum("bij,bi->bj", kernel, u)  # column scaling first, as ot.sinkhorn
        u = a / nx.einsum("bij,bj->bi", kernel, v)
    return u[:, :, None] * kernel * v[:, None, :]


def normalize_similarity_paper(similarity: torch.Tensor, reg: float, num_iters: int) -> torch.Tensor:
    """S' = S + P with P the doubly stochastic (unit marginals) Sinkhorn matrix of S."""
    return similarity + similarity.shape[-1] * sinkhorn_plans(similarity, reg, num_iters)


def balance_similarity_reference(
    similarity: torch.Tensor, num_iters: int = 50, eps: float = REFERENCE_EPS
) -> torch.Tensor:
    """The released loop on raw similarities (negative entries allowed, no kernel).

    Each iteration divides by (column sums + eps) and by (row sums + eps), both computed
    from the same iterate; the loop stops for the whole batch once every sum is within eps
    of 1. Here the stop is a latched flag instead of a `break`, so the loop never waits on
    the device: once stopped, the divisors are exactly 1 (x / 1 == x in IEEE arithmetic),
    which gives the same bits as the `break` without a third pass over the matrix.
    """
    matrix = similarity
    stopped = torch.zeros((), dtype=torch.bool, device=similarity.device)
    one = torch.ones((), dtype=matrix.dtype, device=matrix.device)
    for _ in range(num_iters):
        cols = matrix.sum(dim=-2, keepdim=True)  # (B, 1, L)
        rows = matrix.sum(dim=-1, keepdim=True)  # (B, L, 1)
        converged = ((cols - 1).abs() < eps).all() & ((rows - 1).abs() < eps).all()
        stopped = stopped | converged
        matrix = matrix / torch.where(stopped, one, cols + eps) / torch.where(stopped, one, rows + eps)
    return matrix


def normalize_similarity_reference(similarity: torch.Tensor, num_iters: int) -> torch.Tensor:
    return similarity + balance_similarity_reference(similarity, num_iters)
