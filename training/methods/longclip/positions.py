"""Long-CLIP's positional stretching (Zhang et al. 2024; docs/methods/longclip.md §2): a text tower
trained with context n reads k + f·(n − k) tokens. The first k positional rows are kept and
frozen, every later row is interpolated into f rows, the last one extrapolated. Long-CLIP
uses n = 77, k = 20, f = 4 -> 248; the tiny CPU archs use the same rule with their own n, k.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def compute_stretched_context(context: int, keep: int, factor: int) -> int:
    """Positions after stretching: k + f·(n − k) (Long-CLIP: 20 + 4·57 = 248)."""
    if factor < 1 or not 0 <= keep < context or context < 2:
        raise ValueError(
            f"cannot stretch context {context} keeping {keep} rows by factor {factor} "
            "(need factor >= 1, 0 <= keep < context, context >= 2)"
        )
    return keep + factor * (context - keep)


def stretch_positional_table(table: torch.Tensor, keep: int, factor: int) -> torch.Tensor:
    """(n, w) -> (k + f·(n − k), w). Rows < k copied; old row i >= k gives f rows
    P[i] + (j/f)·(P[i+1] − P[i]), j = 0..f−1, with P[n] := 2·P[n−1] − P[n−2] (linear
    extrapolation past the last row)."""
    n = table.shape[0]
    compute_stretched_context(n, keep, factor)  # validates
    source = table[keep:]  # (n − k, w)
    beyond = 2 * table[-1:] - table[-2:-1]  # (1, w) extrapolated P[n]
    following = torch.cat([table[keep + 1 :], beyond])  # (n − k, w) row i+1 of each source row
    weights = torch.arange(factor, dtype=table.dtype, device=table.device) / factor  # (f,)
    rows = source[:, None] + weights[None, :, None] * (following - source)[:, None]  # (n − k, f, w)
    return torch.cat([table[:keep], rows.reshape(-1, table.shape[1])])


def freeze_rows(module: nn.Module, name: str, num_rows: int) -> None:
    """Declare the first rows of `module.<name>` frozen (Long-CLIP's copy of positions < k):
    `zero_frozen_rows`, which the training step calls on the reduced gradients, zeroes them, and
    with no weight decay on the table (optim.py) AdamW then never moves them. A declaration on
    the module, not a hook on the tensor: FSDP replaces the parameter with its shards and fills
    their gradients itself, and run.precision=bf16 trains a copy, and a hook survives neither."""
    if num_rows:
        module.frozen_rows = {**getattr(module, "frozen_rows", {}), name: num_rows}


def zero_frozen_rows(model: nn.Module) -> None:
    """Zero the declared frozen rows of every gradient (sharded ones on each rank's shard)."""
    for module in model.modules():
        for name, rows in getattr(module, "frozen_rows", {}).items():
            grad = getattr(module, name).grad
            if grad is None:
                continue
            if isinstance(grad, DTensor):  # a keep-mask laid out as the gradient's shards, made once
                grad.mul_(sharded_row_mask(module, name, grad, rows))
            else:
                grad[:rows] = 0


def sharded_row_mask(module: nn.Module, name: str, grad: DTensor, rows: int) -> DTensor:
    """(n, 1) DTensor, 0 on the first `rows` rows, sharded as `grad` (distributing it is a
    collective: done at the first step, cached on the module)."""
    masks = module.__dict__.setdefault("_frozen_row_masks", {})
    if name not in masks:
        keep = (torch.arange(grad.shape[0], device=grad.to_local().device) >= rows).to(grad.dtype)
        masks[name] = distribute_tensor(keep[:, None], grad.device_mesh, grad.placements)
    return masks[name]


def apply_long_text(tower: nn.Module, keep: int, factor: int) -> None:
    """Stretch an open_clip CLIP's text positions in place: positional table, causal mask and
    `context_length`; the first `keep` rows stop learning. factor 1 leaves the tower as is."""
    if factor == 1:
        return
    if not isinstance(getattr(tower, "positional_embedding", None), nn.Parameter):
        raise ValueError(
            f"{type(tower).__name__} has no text positional table to stretch "
            "(only open_clip CLIP towers with their own text transformer)"
        )
    with torch.no_grad():
        table = stretch_positional_table(tower.positional_embedding.data, keep, factor)
    tower.positional_embedding = nn.Parameter(table)
    freeze_rows(tower, "positional_embedding", keep)
    tower.context_length = table.shape[0]
    causal = torch.full((table.shape[0],) * 2, float("-inf"), device=table.device).triu_(1)
    tower.attn_mask = causal  # the (non-persistent) buffer open_clip's encode_text passes on
