"""`run.compile`: torch.compile of the towers, block by block ("regional" compilation).

Every residual block of every open_clip `Transformer` in the model (both towers, and so
PGS's selected-token path and the multi-[CLS] towers, which run the same blocks) is compiled
in place with `nn.Module.compile`: the parameter names, hence checkpoints and the open_clip
export, are unchanged, gradient checkpointing still wraps each (compiled) block, and the
blocks of a tower share one graph, so the compile time is that of one block per tower, not of
the whole depth. What runs around the blocks (patch embedding, FLIP's and PGS's selection,
the losses) stays eager: selection draws from a seeded generator and PGS's `batch_min`
compaction changes the sequence length from step to step, which would recompile; under
compile PGS needs `pgs.compaction=static` (`check_combination` says so).

Graph breaks are counted by dynamo; `compile_metrics` reports them with each log line
(`compile/graph_breaks`, expected 0; `compile/graphs`).
"""

from __future__ import annotations

from collections import Counter

import torch
from open_clip.transformer import Transformer
from torch import nn

BACKENDS = ("inductor", "aot_eager", "eager")  # aot_eager/eager: to tell a compiler fault from a model one


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """Every residual block of every open_clip Transformer in the model, once each."""
    blocks: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, Transformer):
            blocks.update((id(block), block) for block in module.resblocks)
    return list(blocks.values())


def compile_towers(model: nn.Module, backend: str = "inductor") -> int:
    """Compile the model's transformer blocks in place; -> how many."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown run.compile_backend={backend!r}; known: {', '.join(BACKENDS)}")
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError("run.compile: the model has no open_clip transformer blocks to compile")
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def graph_breaks() -> Counter:
    """Dynamo's graph-break reasons in this process so far (reason -> count)."""
    return Counter(torch._dynamo.utils.counters["graph_break"])


def compile_metrics() -> dict:
    """{} when nothing was compiled in this process; else the graph breaks and graphs."""
    graphs = torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)
    if not graphs:
        return {}
    return {"compile/graph_breaks": float(sum(graph_breaks().values())), "compile/graphs": float(graphs)}
