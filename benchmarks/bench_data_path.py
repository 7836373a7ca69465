"""Training from shards through Ray Data against training from batches already in memory.

    python benchmarks/bench_data_path.py [--steps 60] [--batch-size 64] [--workdir bench_out]

Same model, batch, steps and worker count (one): A runs the real job (Ray Train worker
streaming shards through Ray Data: read, decode, crop, edge scores, tokenise); B runs the
same loop in-process over batches prepared beforehand. Ratio A / B near 1 means the input
pipeline keeps up with the step.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from benchmarks.demo_build import add_job_args, ensure_demo_build, mean_samples_per_s
from pipelines import ray_setup, storage
from training import data_mixture, data_order, train
from training.batches import BatchPreprocessor
from training.loop import LoopSettings, run_training
from training.model import build_training_model, sample_geometry
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler


def run_ray_job(build_uri: str, args, workdir: Path) -> float:
    name = f"bench-data-{int(time.time())}"
    train.main(
        [
            "--data",
            build_uri,
            "--method",
            args.method,
            "--arch",
            args.arch,
            "--num-workers",
            "1",
            "--batch-size",
            str(args.batch_size),
            "--epochs",
            "50",
            "--max-steps",
            str(args.steps),
            "--storage",
            str(workdir / "runs"),
            "--run-name",
            name,
            "--log-every",
            "10",
            "--checkpoint-every",
            "100000",
        ]
    )
    return mean_samples_per_s(workdir / "runs" / name / "metrics.jsonl")


def prepare_in_memory(build_uri: str, config, geometry, n_batches: int) -> list[dict]:
    sources = data_mixture.load_sources([build_uri])
    prepare = BatchPreprocessor.for_run(geometry, config.data, 0)
    rows = [
        r
        for item in data_order.plan_worker_epoch(sources, 0, 0, 0, 1, 0)
        for r in data_order.iter_item_samples(item, 0)
    ]
    batches, b = [], config.data.batch_size_per_worker
    for i in range(n_batches):
        chunk = [rows[(i * b + j) % len(rows)] for j in range(b)]
        batches.append(prepare.prepare_rows(chunk))
    return batches


def run_in_memory(build_uri: str, args) -> float:
    config = train.build_config(
        train.parse_args(
            ["--data", build_uri, "--method", args.method, "--arch", args.arch, "--batch-size", str(args.batch_size)]
        )
    )
    torch.manual_seed(0)
    model = build_training_model(config)  # the method's whole model (Multi's towers, Long-CLIP's context)
    batches = prepare_in_memory(build_uri, config, sample_geometry(model, config.model.arch), args.steps)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, 100, 10_000)
    windows = []
    settings = LoopSettings(0, args.steps, 0, 0, 1, torch.device("cpu"), log_every=10, checkpoint_every=10**9)
    run_training(
        model,
        build_training_objective(config, 0, 1, model, torch.device("cpu")),
        optimizer,
        scheduler,
        batches,
        settings,
        lambda step, metrics, ckpt: windows.append(metrics["samples_per_s"]),
    )
    return sum(windows[1:]) / max(1, len(windows) - 1)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    add_job_args(p)
    p.add_argument("--method", default="clip")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    ray_setup.init_ray(num_cpus=4)
    build_uri = ensure_demo_build(workdir, args.n_images)
    torch.set_num_threads(1)  # the Ray worker gets one CPU: give the in-memory run the same
    in_memory = run_in_memory(build_uri, args)
    from_shards = run_ray_job(build_uri, args, workdir)
    print(
        f"in-memory batches : {in_memory:8.1f} samples/s "
        f"({args.method}, {args.arch}, batch {args.batch_size}, 1 worker, 1 thread)"
    )
    print(f"shards via Ray Data: {from_shards:8.1f} samples/s (Ray Train worker, 1 CPU + 1 data actor)")
    print(f"ratio shards / in-memory: {from_shards / in_memory:.2f}")
    storage.open_storage(str(workdir))  # keep workdir for reuse
    return {"in_memory": in_memory, "from_shards": from_shards}


if __name__ == "__main__":
    main()
