"""The scale levers against the plain step: time per step, samples/s, peak memory and model
FLOPs utilisation of each, every variant in a fresh interpreter (no variant inherits another's
memory pages, compiled graphs or allocator state).

    python -m benchmarks.bench_levers                       # CPU: tiny tower, fixed batch
    python -m benchmarks.bench_levers --device cuda --arch ViT-B-16 --precision bf16 \\
        --find-max-batch --variants plain,grad_checkpointing --methods clip,flip   # a GPU slot

Variants: `plain`; `accum_freq=2` / `accum_freq=4` (the same per-worker batch in 2 / 4
micro-batches: less activation memory, one extra forward per step); `grad_checkpointing`;
`compile` (training/compilation.py); `compile+grad_checkpointing`.

With `--find-max-batch` each variant doubles its batch from `--batch-size` until the device
runs out of memory (or `--max-batch`) and reports the largest that ran (power-of-two steps).

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode over one eager
float32 training step under the math attention kernel (forward and backward; matrix
products, convolutions and the attention's two batched products at 2 FLOPs per multiply-add)
of the variant's method at batch 2 on the CPU, divided by 2 for a
per-sample figure; the loss's B x B logits are left out (under 0.1 % at these sizes). They are
*model* FLOPs: gradient checkpointing's recomputation and accumulation's extra no-grad forward
are work the levers add, so they lower the MFU, as they should. MFU = model FLOPs per sample x
samples/s / the device's peak dense bf16 (or fp32) rate (`--peak-tflops`, else a table of
known devices).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.bench_step import (
    median_step_seconds,
    process_peak_gib,
    run_in_fresh_process,
    synthetic_batch,
    variant_arguments,
)
from training.compilation import compile_towers
from training.config import apply_overrides
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model, tower_geometry
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.precision import MasterWeights, resolve_precision

VARIANTS = {
    "plain": {},
    "accum_freq=2": {"run.accum_freq": 2},
    "accum_freq=4": {"run.accum_freq": 4},
    "grad_checkpointing": {"run.grad_checkpointing": True},
    "compile": {"run.compile": True},
    "compile+grad_checkpointing": {"run.compile": True, "run.grad_checkpointing": True},
}
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
}  # dense, SXM parts (NVIDIA's data sheets)


def build_step(method: str, overrides: dict, args, batch_size: int, device: torch.device):
    """(run_step(step), model) of one variant at one batch size."""
    config = apply_overrides(
        build_method_config(method),
        {
            "model.arch": args.arch,
            "run.precision": args.precision,
            "data.batch_size_per_worker": batch_size,
            **overrides,
        },
    )
    torch.manual_seed(0)
    model = build_training_model(config).to(device)
    precision = resolve_precision(config.run.precision, device)
    weights = MasterWeights(model) if precision == "bf16" else None
    runner = weights.compute if weights else model
    if config.run.compile:
        compile_towers(runner)
    objective = build_training_objective(config, 0, 1, model, device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 10, 10_000)
    settings = LoopSettings(0, 10_000, 0, 0, 1, device, bf16=precision == "amp_bf16", accum_freq=config.run.accum_freq)
    batch = synthetic_batch(args.arch, tower_geometry(model)[0], batch_size)

    def run_step(step: int) -> None:
        seed_step(runner, 0, step, 0)
        train_step(runner, objective, optimizer, scheduler, batch, settings, step=step, weights=weights)

    return run_step, model


def flops_per_sample(method: str, args) -> float:
    """Model FLOPs of one training step per sample, counted at batch 2 in float32 eager."""
    counting = argparse.Namespace(**{**vars(args), "precision": "fp32"})
    run_step, _ = build_step(method, {}, counting, 2, torch.device("cpu"))
    # the math attention kernel: the CPU's fused one is not among the counter's registered ops
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        run_step(0)
    return counter.get_total_flops() / 2


def time_at(method: str, name: str, args, batch_size: int, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run_step, _ = build_step(method, VARIANTS[name], args, batch_size, device)
    step_s = median_step_seconds(run_step, device, args.warmup, args.steps)
    return {
        "batch": batch_size,
        "step_s": step_s,
        "samples_per_s": batch_size / step_s,
        "peak_gib": process_peak_gib(device),
    }


def largest_batch(method: str, name: str, args, device: torch.device) -> dict:
    """The timing at the largest power-of-two multiple of --batch-size that fits."""
    best, batch_size = None, args.batch_size
    while batch_size <= args.max_batch:
        try:
            best = time_at(method, name, args, batch_size, device)
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache() if device.type == "cuda" else None
        batch_size *= 2
    if best is None:
        raise SystemExit(f"{method} {name}: batch {args.batch_size} does not fit")
    best["max_batch_searched"] = args.max_batch
    return best


def run_variant(method: str, name: str, args) -> dict:
    """One variant's figures (this interpreter: `--only method/name`)."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    result = (
        largest_batch(method, name, args, device)
        if args.find_max_batch
        else time_at(method, name, args, args.batch_size, device)
    )
    return {"method": method, "variant": name, **result}


def peak_tflops(args) -> float:
    if args.peak_tflops:
        return args.peak_tflops
    if args.device != "cuda":
        return float("nan")
    kind = "fp32" if resolve_precision(args.precision, torch.device("cuda")) == "fp32" else "bf16"
    name = torch.cuda.get_device_name()
    return next((rates[kind] for key, rates in PEAK_TFLOPS.items() if key in name), float("nan"))


def report_line(r: dict, plain: dict, flops: float, peak: float) -> None:
    """One variant's line, as soon as it is measured (a slot that runs out keeps what it got)."""
    achieved = flops * r["samples_per_s"] / 1e12
    r["model_tflops"], r["mfu"] = achieved, achieved / peak
    print(
        f"{r['method']:5s} {r['variant']:27s} batch {r['batch']:6d}  {r['step_s'] * 1e3:9.1f} ms/step  "
        f"{r['samples_per_s']:9.1f} samples/s  x{r['samples_per_s'] / plain['samples_per_s']:.2f} of plain  "
        f"peak {r['peak_gib']:6.2f} GiB (x{r['peak_gib'] / plain['peak_gib']:.2f})  "
        f"{achieved:7.2f} model TFLOP/s  MFU {r['mfu']:.1%}",
        flush=True,
    )


def arguments() -> argparse.ArgumentParser:
    p = variant_arguments(__doc__)  # --arch --batch-size --steps --warmup --device --threads --only
    p.set_defaults(batch_size=64, steps=8)
    p.add_argument("--methods", default="clip")
    p.add_argument("--variants", default="plain,accum_freq=2,accum_freq=4,grad_checkpointing,compile")
    p.add_argument("--precision", default="auto")
    p.add_argument("--find-max-batch", action="store_true")
    p.add_argument("--max-batch", type=int, default=8192)
    p.add_argument("--peak-tflops", type=float, default=None)
    return p


def main(argv=None) -> list[dict]:
    argv = list(argv) if argv is not None else None
    args = arguments().parse_args(argv)
    if args.only:
        print(json.dumps(run_variant(*args.only.split("/", 1), args)))
        return []
    methods, names = args.methods.split(","), args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown or "plain" not in names:
        raise SystemExit(f"--variants must include plain and name known ones: {', '.join(VARIANTS)}")
    passed = argv if argv is not None else sys.argv[1:]
    torch.set_num_threads(args.threads)
    flops, peak = {m: flops_per_sample(m, args) for m in methods}, peak_tflops(args)
    print(
        "model FLOPs per sample (FlopCounterMode, fwd+bwd): "
        + ", ".join(f"{m} {f / 1e9:.2f} GFLOP" for m, f in flops.items())
        + f"; peak {peak} TFLOP/s ({args.device}, precision {args.precision})",
        flush=True,
    )
    results = []
    for method in methods:
        plain = None
        for name in ["plain"] + [n for n in names if n != "plain"]:
            results.append(run_in_fresh_process("benchmarks.bench_levers", f"{method}/{name}", passed))
            plain = plain or results[-1]
            report_line(results[-1], plain, flops[method], peak)
    return results


if __name__ == "__main__":
    main()
