"""Training-step time and peak memory of CIBR against plain fine-tuning of the same tower and
batch: the extra cost is the frozen reference towers' forward (no grad, in the step's
precision), the gathered noisy features and the four statistics networks' update and
encoder-side pass.

    python -m benchmarks.bench_cibr_step                                   # tiny tower, CPU
    python -m benchmarks.bench_cibr_step --device cuda --arch ViT-B-32 --batch-size 256

Both variants start from the same weights (`--pretrained`, default: a freshly initialised
tower saved as a checkpoint of this project: weights do not change the cost) with the
temperature fixed, as CIBR's recipe fine-tunes. On CUDA the step runs in bf16 autocast and
peak memory is torch's allocator peak; on CPU it is the peak resident set of a fresh process
per variant (see bench_topology_step.py).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_step import (
    median_step_seconds,
    process_peak_gib,
    run_in_fresh_process,
    synthetic_batch,
    variant_arguments,
)
from training import checkpoint
from training.config import apply_overrides
from training.loop import LoopSettings, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model, tower_geometry
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler

VARIANTS = {
    "finetune": ("clip", {"loss.learn_temperature": False}),
    "cibr": ("cibr", {"cibr.warmup_steps": 0, "cibr.ramp_steps": 0, "cibr.lambda": 0.5}),
}


def time_variant(name: str, args) -> dict:
    method, overrides = VARIANTS[name]
    config = apply_overrides(
        build_method_config(method), {"model.arch": args.arch, "model.pretrained": args.pretrained, **overrides}
    )
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_training_model(config).to(device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 10, 10_000)
    objective = build_training_objective(config, 0, 1, model, device)
    settings = LoopSettings(0, 10_000, 0, 0, 1, device, bf16=device.type == "cuda")
    batch = synthetic_batch(args.arch, tower_geometry(model)[0], args.batch_size)

    def run_step(step: int) -> None:
        train_step(model, objective, optimizer, scheduler, batch, settings, step=step)

    step_s, peak = median_step_seconds(run_step, device, args.warmup, args.steps), process_peak_gib(device)
    return {"variant": name, "step_s": step_s, "samples_per_s": args.batch_size / step_s, "peak_gib": peak}


def write_start_checkpoint(arch: str, directory: Path) -> str:
    config = apply_overrides(build_method_config("clip"), {"model.arch": arch})
    torch.manual_seed(0)
    model = build_training_model(config)
    optimizer = build_optimizer(model, config.optim)
    return str(
        checkpoint.save_checkpoint(
            directory / "step_00000000", model, optimizer, build_scheduler(optimizer, 1, 2), 0, config, {}
        )
    )


def parse_args(argv):
    p = variant_arguments(__doc__)
    p.add_argument("--pretrained", default=None, help="starting weights (default: a fresh checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.only:  # child process: one variant, one JSON line
        print(json.dumps(time_variant(args.only, args)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.pretrained is None:
            argv += ["--pretrained", write_start_checkpoint(args.arch, Path(tmp))]
        results = {name: run_in_fresh_process("benchmarks.bench_cibr_step", name, argv) for name in VARIANTS}
    for r in results.values():
        print(
            f"{r['variant']:9s} {args.arch} batch {args.batch_size} on {args.device}: "
            f"{r['step_s'] * 1e3:8.1f} ms/step  "
            f"{r['samples_per_s']:8.1f} samples/s  peak {r['peak_gib']:.2f} GiB"
        )
    plain, cibr = results["finetune"], results["cibr"]
    step_ratio, memory_ratio = cibr["step_s"] / plain["step_s"], cibr["peak_gib"] / plain["peak_gib"]
    print(
        f"CIBR / plain fine-tuning: step time {step_ratio:.3f}x, peak memory {memory_ratio:.3f}x "
        "(docs/methods/cibr.md §2 expects +30-50 % step time from the frozen forward)"
    )
    return {"results": results, "step_ratio": step_ratio, "memory_ratio": memory_ratio}


if __name__ == "__main__":
    main()
