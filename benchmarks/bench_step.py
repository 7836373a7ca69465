"""Training-step throughput of CLIP against FLIP on the same model and batch.

    python benchmarks/bench_step.py [--arch clip-tiny-p8-64] [--batch-size 128] [--device cuda]

FLIP removes tokens from the sequence, so its step must be cheaper; the text tower caps
the gain (about 1.75x fewer FLOPs for ViT-B/16 at 50 %, not 2x).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from training.batches import IMAGES, TEXTS
from training.methods.clip.loss import ContrastiveLoss
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.config import temperature_of
from training.model import build_model, tower_geometry
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer


def synthetic_batch(arch: str, image_size: int, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    captions = [f"a {c} shape number {i}" for i, c in enumerate(rng.choice(["red", "blue"], batch_size))]
    return {
        IMAGES: rng.integers(0, 256, (batch_size, 3, image_size, image_size), dtype=np.uint8),
        TEXTS: build_tokenizer(arch)(captions).numpy(),
    }


def median_step_seconds(run_step, device: torch.device, warmup: int, steps: int) -> float:
    """Median wall time of `run_step(step)` over `steps` steps after `warmup` ones (the device
    synchronised around each on CUDA)."""
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[warmup:]))


def process_peak_gib(device: torch.device) -> float:
    """torch's allocator peak on CUDA, else this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def variant_arguments(description: str) -> argparse.ArgumentParser:
    """The options of a benchmark that times each variant in a fresh interpreter."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    return p


def run_in_fresh_process(module: str, name: str, argv: list[str]) -> dict:
    """`python -m module *argv --only name` (its last stdout line is one JSON result), so that no
    variant inherits another's memory pages."""
    out = subprocess.run(
        [sys.executable, "-m", module, *argv, "--only", name],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def time_method(method: str, args) -> dict:
    overrides = build_method_config(method)
    model_cfg = overrides.model.__class__(arch=args.arch)
    masking = overrides.masking.__class__(overrides.masking.kind, args.mask_ratio if method == "flip" else 0.0)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(model_cfg, masking, temperature_of(overrides.loss, overrides.topology)).to(device)
    optimizer = build_optimizer(model, overrides.optim)
    scheduler = build_scheduler(optimizer, 10, 10_000)
    settings = LoopSettings(0, 10_000, 0, 0, 1, device, bf16=device.type == "cuda")
    batch = synthetic_batch(args.arch, tower_geometry(model)[0], args.batch_size)

    def run_step(step: int) -> None:
        seed_step(model, 0, step, 0)
        train_step(model, ContrastiveLoss(), optimizer, scheduler, batch, settings)

    step_s = median_step_seconds(run_step, device, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"method": method, "step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_gib": peak}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--mask-ratio", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a Ray worker with one CPU gets one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {m: time_method(m, args) for m in ("clip", "flip")}
    for r in results.values():
        print(
            f"{r['method']:5s} {args.arch} batch {args.batch_size} on {args.device} ({args.threads} thread(s)): "
            f"{r['step_s'] * 1e3:8.1f} ms/step  {r['samples_per_s']:9.1f} samples/s  peak {r['peak_gib']:.2f} GiB"
        )
    ratio = results["flip"]["samples_per_s"] / results["clip"]["samples_per_s"]
    print(f"FLIP({args.mask_ratio}) / CLIP throughput ratio: {ratio:.2f}x")
    return {"results": results, "ratio": ratio}


if __name__ == "__main__":
    main()
