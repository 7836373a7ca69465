"""Zero-shot accuracy of FLIP against CLIP-PGS (paper and reference mode) trained on the demo
corpus with the same model, mask ratio, seed (hence init and data order) and step budget.

    python benchmarks/bench_pgs_vs_flip.py [--n-images 2000] [--epochs 8] [--ratio 0.5]

Each method runs the real job (training/train.py on Ray Train, 2 workers) and the real
evaluation job (zero-shot on the demo corpus's held-out folder); the table lists top-1 and
its multiple of chance, the mean realised drop, and wall time.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.demo_build import ensure_demo_build
from evaluation import evaluate
from pipelines import ray_setup
from training import train

PGS_METHOD = {0.5: "pgs0.5", 0.3: "pgs0.3"}


def method_runs(ratio: float) -> dict[str, list[str]]:
    """Label -> extra train.py arguments; FLIP at `ratio` against PGS with lower bound `ratio`."""
    pgs = PGS_METHOD[ratio]
    return {f"flip{ratio}": ["--method", "flip", "--mask-ratio", str(ratio)],
            f"{pgs}-paper": ["--method", pgs, "--set", "pgs.mode=paper"],
            f"{pgs}-reference": ["--method", pgs, "--set", "pgs.mode=reference"]}


def train_and_evaluate(label: str, extra: list[str], build_uri: str, args, workdir: Path) -> dict:
    run = f"pgs-vs-flip-{label}-{int(time.time())}"
    start = time.monotonic()
    train.main(["--data", build_uri, *extra, "--arch", args.arch, "--num-workers", "2",
                "--batch-size", str(args.batch_size), "--epochs", str(args.epochs), "--lr", str(args.lr),
                "--warmup-steps", "20", "--seed", str(args.seed), "--storage", str(workdir / "runs"),
                "--run-name", run, "--log-every", "10", "--checkpoint-every", "100000"])
    train_s = time.monotonic() - start
    zeroshot_dir = workdir / f"corpus-{args.n_images}" / "eval" / "zeroshot"
    report = evaluate.main(["--checkpoint", str(workdir / "runs" / run),
                            "--output", str(workdir / "reports" / run),
                            "--zeroshot", f"demo-zeroshot={zeroshot_dir}"])
    zeroshot = next(iter(report["zeroshot"].values()))
    rows = [json.loads(line) for line in (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    drops = [r["masking/drop_fraction"] for r in rows if "masking/drop_fraction" in r]
    return {"label": label, "top1": zeroshot["top1"], "chance": 1.0 / zeroshot["n_classes"],
            "drop": sum(drops) / len(drops) if drops else args.ratio, "steps": rows[-1]["step"],
            "train_s": train_s}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (2 workers)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ratio", type=float, default=0.5, choices=sorted(PGS_METHOD))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    ray_setup.init_ray(num_cpus=train.local_cpu_budget(train.build_config(train.parse_args(
        ["--data", "-", "--num-workers", "2"]))))
    build_uri = ensure_demo_build(workdir, args.n_images)
    results = [train_and_evaluate(label, extra, build_uri, args, workdir)
               for label, extra in method_runs(args.ratio).items()]
    print(f"\n{args.arch}, {args.n_images} demo images, {args.epochs} epochs, 2 workers x {args.batch_size}, "
          f"lr {args.lr}, seed {args.seed}")
    print(f"{'method':22s} {'steps':>5s} {'drop':>6s} {'zero-shot top-1':>16s} {'x chance':>9s} "
          f"{'train s':>8s}")
    for r in results:
        print(f"{r['label']:22s} {r['steps']:5d} {r['drop']:6.3f} {r['top1']:16.3f} "
              f"{r['top1'] / r['chance']:9.1f} {r['train_s']:8.0f}")
    return results


if __name__ == "__main__":
    main()
