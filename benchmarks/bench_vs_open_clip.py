"""Our training job against open_clip's own trainer on the same tiny model config, batch and
precision (fp32 on CPU, one process): the comparison our users will make first.

    python benchmarks/bench_vs_open_clip.py [--batch-size 64] [--steps 60]

open_clip runs `python -m open_clip_train.main --dataset-type webdataset` on the tars of the
same demo build that ours reads (and, for reference, `--dataset-type synthetic`); ours runs
`training/train.py` on that build with one Ray Train worker. Both report samples per second
after warm-up.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.demo_build import add_job_args, ensure_demo_build, mean_samples_per_s
from pipelines import ray_setup, shards
from training import train
from training.towers import MODEL_CONFIG_DIR

OPEN_CLIP_DRIVER = (
    "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
    "from open_clip_train.main import main; main(sys.argv[2:])"
)
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def open_clip_data_args(args, build_uri: str | None) -> list[str]:
    """OpenCLIP's data options: our build's tars through its WebDataset loader (they carry
    `<key>.txt` and shards/sizes.json), or its synthetic images."""
    if build_uri is None:
        return ["--dataset-type", "synthetic", "--train-num-samples", str(args.batch_size * args.steps)]
    last = len(shards.read_manifest(build_uri)["shards"]) - 1
    return [
        "--dataset-type",
        "webdataset",
        "--train-data",
        f"{build_uri}/shards/{{000000..{last:06d}}}.tar",
        "--train-num-samples",
        str(args.batch_size * args.steps),
        "--dataset-resampled",
    ]


def run_open_clip(args, workdir: Path, build_uri: str | None = None) -> float:
    argv = [
        *open_clip_data_args(args, build_uri),
        "--batch-size",
        str(args.batch_size),
        "--model",
        args.arch,
        "--epochs",
        "1",
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--lr",
        "5e-4",
        "--warmup",
        "10",
        "--log-every-n-steps",
        "10",
        "--logs",
        str(workdir / "open_clip_logs"),
        "--name",
        f"bench-{int(time.time())}",
        "--report-to",
        "",
        "--save-frequency",
        "0",
        "--device",
        "cpu",
        "--seed",
        "0",
    ]
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", OPEN_CLIP_DRIVER, str(MODEL_CONFIG_DIR), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
    )
    times = [float(t) for t in BATCH_TIME.findall(proc.stdout + proc.stderr)]
    if not times:
        raise RuntimeError(f"open_clip_train printed no batch times:\n{proc.stderr[-3000:]}")
    return args.batch_size / times[-1]  # its running average over the epoch


def run_ours(build_uri: str, args, workdir: Path) -> float:
    name = f"bench-ours-{int(time.time())}"
    train.main(
        [
            "--data",
            build_uri,
            "--method",
            "clip",
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


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    add_job_args(p)
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    ray_setup.init_ray(num_cpus=4)
    build_uri = ensure_demo_build(workdir, args.n_images)
    theirs = run_open_clip(args, workdir, build_uri)
    synthetic = run_open_clip(args, workdir)
    ours = run_ours(build_uri, args, workdir)
    print(f"open_clip_train (our shards via its WebDataset loader, 1 process, fp32): {theirs:8.1f} samples/s")
    print(f"open_clip_train (synthetic data, 1 process, fp32): {synthetic:8.1f} samples/s")
    print(f"ours (Ray Train, 1 worker, shards via Ray Data, fp32): {ours:8.1f} samples/s")
    print(f"ratio ours / open_clip on the same shards: {ours / theirs:.2f}")
    return {"open_clip": theirs, "open_clip_synthetic": synthetic, "ours": ours}


if __name__ == "__main__":
    main()
