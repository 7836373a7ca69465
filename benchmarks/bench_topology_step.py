"""Training-step time and peak memory of Multi(n, m) against CLIP on the same tower and batch.

    python benchmarks/bench_topology_step.py                       # tiny tower, CPU
    python benchmarks/bench_topology_step.py --device cuda --arch ViT-B-16 --batch-size 256

The paper (Design of the topology ..., §4): Multi(32, 16) costs under 8 % more than CLIP on
ViT-B/16; the extra cost is the m − 1 class tokens in both towers' attention. On CUDA the step
runs in bf16 autocast (the loop's default) and peak memory is torch's allocator peak; on CPU it
is the peak resident set of a fresh process per variant (each variant runs in its own
interpreter, so one cannot inherit the other's pages). Oblique Ob(n, m) has no parameters or
tokens of its own: its step costs what CLIP's does (printed for reference).
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.bench_step import (
    median_step_seconds,
    process_peak_gib,
    run_in_fresh_process,
    synthetic_batch,
    variant_arguments,
)
from training.config import apply_overrides
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model, tower_geometry
from training.objectives import build_objective
from training.optim import build_optimizer, build_scheduler

VARIANTS = {"clip": {}, "oblique(n,m)": {"topology.kind": "oblique"}, "multi(n,m)": {"topology.kind": "multi"}}


def time_variant(name: str, args) -> dict:
    overrides = {"model.arch": args.arch, **VARIANTS[name]}
    if name != "clip":  # oblique splits the tower's own embed_dim: n = embed_dim / m
        overrides.update({"topology.n": args.n if name.startswith("multi") else 0, "topology.m": args.m})
    config = apply_overrides(build_method_config("clip"), overrides)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_training_model(config).to(device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 10, 10_000)
    objective = build_objective(config.loss, config.smartclip, 0, 1, model.topology)
    settings = LoopSettings(0, 10_000, 0, 0, 1, device, bf16=device.type == "cuda")
    batch = synthetic_batch(args.arch, tower_geometry(model)[0], args.batch_size)

    def run_step(step: int) -> None:
        seed_step(model, 0, step, 0)
        train_step(model, objective, optimizer, scheduler, batch, settings)

    step_s, peak = median_step_seconds(run_step, device, args.warmup, args.steps), process_peak_gib(device)
    return {
        "variant": name,
        "topology": model.topology.describe(),
        "step_s": step_s,
        "samples_per_s": args.batch_size / step_s,
        "peak_gib": peak,
    }


def parse_args(argv):
    p = variant_arguments(__doc__)
    p.add_argument("--n", type=int, default=32, help="dims per [CLS] token / sphere")
    p.add_argument("--m", type=int, default=16, help="[CLS] tokens / spheres")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:  # child process: one variant, one JSON line
        print(json.dumps(time_variant(args.only, args)))
        return {}
    results = {name: run_in_fresh_process("benchmarks.bench_topology_step", name, argv) for name in VARIANTS}
    for r in results.values():
        t = r["topology"]
        print(
            f"{r['variant']:13s} {t['kind']}({t['n']}, {t['m']}) {args.arch} batch {args.batch_size} on {args.device}: "
            f"{r['step_s'] * 1e3:8.1f} ms/step  {r['samples_per_s']:8.1f} samples/s  peak {r['peak_gib']:.2f} GiB"
        )
    clip, multi = results["clip"], results["multi(n,m)"]
    step_ratio, memory_ratio = multi["step_s"] / clip["step_s"], multi["peak_gib"] / clip["peak_gib"]
    print(
        f"Multi({args.n}, {args.m}) / CLIP: step time {step_ratio:.3f}x, peak memory {memory_ratio:.3f}x "
        f"(paper, ViT-B/16: < 1.08x)"
    )
    return {"results": results, "step_ratio": step_ratio, "memory_ratio": memory_ratio}


if __name__ == "__main__":
    main()
