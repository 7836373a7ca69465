"""Zero-shot accuracy of FLIP against CLIP-PGS (paper and reference mode) trained on the demo
corpus with the same model, mask ratio, seed (hence init and data order) and step budget.

    python benchmarks/bench_pgs_vs_flip.py [--n-images 2000] [--epochs 8] [--ratio 0.5] [--seeds 0 1 2]

Each method runs the real job (training/train.py on Ray Train, 2 workers) and the real
evaluation job (zero-shot on a held-out demo folder of --eval-per-class images per class,
larger than the corpus's own 8 so that one run's top-1 is not within a few images of
another's); the table lists top-1 and its multiple of chance, the mean realised drop, and
wall time per run, then per method the mean over seeds and the paired difference to FLIP
(same seed: same initialisation and data order) with its standard error over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.demo_build import ensure_demo_build
from evaluation import evaluate
from pipelines import ray_setup
from pipelines.demo_corpus import SCENES_JSONL, ImageSettings, write_zeroshot_split
from training import train

PGS_METHOD = {0.5: "pgs0.5", 0.3: "pgs0.3"}


def method_runs(ratio: float) -> dict[str, list[str]]:
    """Label -> extra train.py arguments; FLIP at `ratio` against PGS with lower bound `ratio`."""
    pgs = PGS_METHOD[ratio]
    return {
        f"flip{ratio}": ["--method", "flip", "--mask-ratio", str(ratio)],
        f"{pgs}-paper": ["--method", pgs, "--set", "pgs.mode=paper"],
        f"{pgs}-reference": ["--method", pgs, "--set", "pgs.mode=reference"],
    }


def ensure_zeroshot_split(workdir: Path, per_class: int) -> Path:
    """A held-out zero-shot folder of the demo's classes (its own image stream, 128 px)."""
    folder = workdir / f"zeroshot-{per_class}"
    if not (folder / SCENES_JSONL).exists():
        write_zeroshot_split(folder, per_class, ImageSettings(128, 95), seed=1)
    return folder


def train_and_evaluate(
    label: str, extra: list[str], seed: int, build_uri: str, zeroshot_dir: Path, args, workdir: Path
) -> dict:
    run = f"pgs-vs-flip-{label}-s{seed}-{int(time.time())}"
    start = time.monotonic()
    train.main(
        [
            "--data",
            build_uri,
            *extra,
            "--arch",
            args.arch,
            "--num-workers",
            "2",
            "--batch-size",
            str(args.batch_size),
            "--epochs",
            str(args.epochs),
            "--lr",
            str(args.lr),
            "--warmup-steps",
            "20",
            "--seed",
            str(seed),
            "--storage",
            str(workdir / "runs"),
            "--run-name",
            run,
            "--log-every",
            "10",
            "--checkpoint-every",
            "100000",
        ]
    )
    train_s = time.monotonic() - start
    report = evaluate.main(
        [
            "--checkpoint",
            str(workdir / "runs" / run),
            "--output",
            str(workdir / "reports" / run),
            "--zeroshot",
            f"demo-zeroshot={zeroshot_dir}",
        ]
    )
    zeroshot = next(iter(report["zeroshot"].values()))
    rows = [json.loads(line) for line in (workdir / "runs" / run / "metrics.jsonl").read_text().splitlines()]
    drops = [r["masking/drop_fraction"] for r in rows if "masking/drop_fraction" in r]
    return {
        "label": label,
        "seed": seed,
        "top1": zeroshot["top1"],
        "chance": 1.0 / zeroshot["n_classes"],
        "drop": sum(drops) / len(drops) if drops else args.ratio,
        "steps": rows[-1]["step"],
        "train_s": train_s,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--batch-size", type=int, default=64, help="per worker (2 workers)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ratio", type=float, default=0.5, choices=sorted(PGS_METHOD))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-per-class", type=int, default=25)
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    ray_setup.init_ray(
        num_cpus=train.local_cpu_budget(train.build_config(train.parse_args(["--data", "-", "--num-workers", "2"])))
    )
    build_uri = ensure_demo_build(workdir, args.n_images)
    zeroshot_dir = ensure_zeroshot_split(workdir, args.eval_per_class)
    results = [
        train_and_evaluate(label, extra, seed, build_uri, zeroshot_dir, args, workdir)
        for seed in args.seeds
        for label, extra in method_runs(args.ratio).items()
    ]
    print_runs(results, args)
    print_summary(results)
    return results


def print_runs(results: list[dict], args) -> None:
    print(
        f"\n{args.arch}, {args.n_images} demo images, {args.epochs} epochs, 2 workers x {args.batch_size}, "
        f"lr {args.lr}, seeds {args.seeds}, zero-shot on {args.eval_per_class} images per class"
    )
    print(
        f"{'method':22s} {'seed':>4s} {'steps':>5s} {'drop':>6s} {'zero-shot top-1':>16s} {'x chance':>9s} "
        f"{'train s':>8s}"
    )
    for r in results:
        print(
            f"{r['label']:22s} {r['seed']:4d} {r['steps']:5d} {r['drop']:6.3f} {r['top1']:16.3f} "
            f"{r['top1'] / r['chance']:9.1f} {r['train_s']:8.0f}"
        )


def print_summary(results: list[dict]) -> None:
    """Per method: mean top-1 over seeds, and the paired difference to FLIP (same seed)."""
    by_label: dict[str, dict[int, float]] = {}
    for r in results:
        by_label.setdefault(r["label"], {})[r["seed"]] = r["top1"]
    flip_label = next(label for label in by_label if label.startswith("flip"))
    flip = by_label[flip_label]
    print(f"\n{'method':22s} {'mean top-1':>10s} {'minus FLIP':>11s} {'s.e.':>6s} {'wins':>5s}")
    for label, tops in by_label.items():
        diffs = [tops[seed] - flip[seed] for seed in tops]
        se = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
        wins = sum(d >= 0 for d in diffs)
        print(
            f"{label:22s} {statistics.mean(tops.values()):10.3f} {statistics.mean(diffs):+11.3f} "
            f"{se:6.3f} {wins:2d}/{len(diffs)}"
        )


if __name__ == "__main__":
    main()
