"""Seconds per inverted image (OTI) and per inverted text (OVI): batched against one query at
a time, on the same frozen tower.

    python -m benchmarks.bench_inversion                                  # tiny tower, CPU
    python -m benchmarks.bench_inversion --device cuda --arch ViT-B-32    # the paper's tower

The paper (Cross the Gap, §4): 0.2 s per image for OTI (150 steps) and 0.5 s per text for OVI
(1000 steps) on one A100 with ViT-B/32. Each batch size is timed for a few dozen optimisation
steps (`evaluation.inversion.optimise`, the code the encoder actors run: AdamW on the
pseudo-inputs, bf16 autocast on CUDA) and scaled to the paper's step counts, so the
measurement fits a short GPU slot. On CUDA the batch doubles until it runs out of memory or
reaches --max-batch; the largest batch that ran is the headline. The towers are randomly
initialised (speed does not depend on the weights; nothing is downloaded).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from evaluation.inversion import (
    InversionConfig,
    PseudoPatchImage,
    PseudoTokenText,
    frozen,
    initial_pseudo_inputs,
    optimise,
)
from training.towers import build_tokenizer, build_tower_model

PAPER_SECONDS = {"oti": 0.2, "ovi": 0.5}  # per query, A100, ViT-B/32


def time_batch(forward, width: int, dim: int, queries: int, config: InversionConfig, device) -> float:
    """Seconds per optimisation step for `queries` queries (median-free: one timed run of
    config.steps steps after a warm-up of 2)."""
    targets = F.normalize(torch.randn(queries, dim, device=device), dim=-1)
    init = initial_pseudo_inputs([str(i) for i in range(queries)], config.k, width, config.seed)
    optimise(forward, targets, init, replace(config, steps=2))  # warm-up (allocator, kernels)
    sync(device)
    start = time.perf_counter()
    with torch.enable_grad():
        optimise(forward, targets, init, config)
    sync(device)
    return (time.perf_counter() - start) / config.steps


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def batch_sizes(args, device) -> list[int]:
    if device.type != "cuda":
        return [int(b) for b in args.batches.split(",")]
    sizes, b = [], 1
    while b <= args.max_batch:
        sizes.append(b)
        b *= 4 if b < 256 else 2
    return sizes


def measure(kind: str, tower, tokenizer, args, device) -> list[dict]:
    config = InversionConfig(kind=kind, k=args.k, steps=args.steps)
    full_steps = InversionConfig(kind=kind).num_steps
    forward = PseudoTokenText(tower, tokenizer, config) if kind == "oti" else PseudoPatchImage(tower.visual)
    dim = tower.text_projection.shape[1]
    rows = []
    for queries in batch_sizes(args, device):
        try:
            step_s = time_batch(forward, forward.width, dim, queries, config, device)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        rows.append(
            {
                "kind": kind,
                "queries": queries,
                "step_ms": step_s * 1e3,
                "s_per_query": step_s * full_steps / queries,
                "steps": full_steps,
            }
        )
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20, help="timed optimisation steps per batch size")
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batches", default="1,16,64,256", help="CPU batch sizes")
    p.add_argument("--max-batch", type=int, default=8192, help="CUDA: stop doubling here")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    tower = build_tower_model(args.arch).to(device)
    tokenizer = build_tokenizer(args.arch)
    results = {}
    with frozen(tower):
        for kind in ("oti", "ovi"):
            rows = measure(kind, tower, tokenizer, args, device)
            for r in rows:
                print(
                    f"{kind} {args.arch} on {args.device} k={args.k}: batch {r['queries']:5d}  "
                    f"{r['step_ms']:9.1f} ms/step  {r['s_per_query']:8.4f} s per query at {r['steps']} steps"
                )
            single, best = rows[0], min(rows, key=lambda r: r["s_per_query"])
            print(
                f"{kind}: batch {best['queries']} is {single['s_per_query'] / best['s_per_query']:.1f}x faster per "
                f"query than one at a time; {best['s_per_query']:.4f} s per query against the paper's "
                f"{PAPER_SECONDS[kind]} s (A100, ViT-B/32)"
            )
            results[kind] = {
                "rows": rows,
                "best": best,
                "speedup_vs_single": single["s_per_query"] / best["s_per_query"],
            }
    return results


if __name__ == "__main__":
    main()
