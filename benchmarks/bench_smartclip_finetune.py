"""SmartCLIP vs Long-CLIP vs CLIP fine-tuning at demo scale (the shape of the paper's Table 2).

    python benchmarks/bench_smartclip_finetune.py --workdir bench_smartclip --n-images 2000

A small CLIP (clip-tiny-p8-64-ctx24: 24 text positions, so long captions are truncated as
OpenAI CLIP's 77 truncate ShareGPT4V's) is pretrained on the demo corpus's short captions
only. It is then fine-tuned three ways with the same budget, seed, data order and recipe
(text stretched 24 -> 8 + 4·16 = 72 positions, the same learning rates, logit scale reset):
plain CLIP on one sampled caption per image (long with probability 0.5, else a short one),
Long-CLIP (long caption + short caption against the batch's top-k image components), and
SmartCLIP (mask network + modular loss on the same sampled captions). Every model is scored
by the evaluation job: long-caption retrieval R@1 both ways on the demo's Urban1k-layout set,
short-caption zero-shot top-1 and Karpathy-layout short-caption retrieval; SmartCLIP also
with the masked scorer. Prints one table; writes results.json under --workdir. Finished runs
and reports under --workdir are reused (delete it to start over).

Time on 2 shared cores with the defaults (one seed): demo build ~1.5 min, pretrain ~4.5 min,
the three fine-tunes ~3 min each, five evaluation jobs ~1 min each: about 20 min, more when
the machine is busy. `--n-images 1000 --pretrain-epochs 8 --finetune-epochs 3` is cheaper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.demo_build import ensure_demo_build  # noqa: E402
from evaluation import evaluate  # noqa: E402
from training import train  # noqa: E402

ARCH = "clip-tiny-p8-64-ctx24"
FINETUNES = {
    "clip": ["--set", "data.caption_policy=mix"],
    "longclip": [],
    "smartclip": ["--set", "data.caption_policy=mix"],
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_smartclip")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=10)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--finetune-epochs", type=int, default=4)
    p.add_argument("--finetune-lr", type=float, default=2e-4, help="CLIP towers")
    p.add_argument("--new-module-lr", type=float, default=1e-3, help="SmartCLIP's mask network")
    p.add_argument("--lambda-sparsity", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="of the pretrain")
    p.add_argument("--finetune-seeds", type=int, nargs="+", default=[0], help="one fine-tune per method and seed")
    return p.parse_args(argv)


def common_flags(args, build_uri: str, workdir: Path, epochs: int, lr: float, seed: int) -> list[str]:
    return [
        "--data",
        build_uri,
        "--arch",
        ARCH,
        "--num-workers",
        "1",
        "--batch-size",
        str(args.batch_size),
        "--epochs",
        str(epochs),
        "--lr",
        str(lr),
        "--seed",
        str(seed),
        "--storage",
        str(workdir / "runs"),
        "--log-every",
        "20",
        "--checkpoint-every",
        "100000",
    ]


def finetune_flags(args, pretrained: str) -> list[str]:
    """Long-CLIP's recipe, identical for the three fine-tunes (the `clip` method would
    otherwise keep its from-scratch defaults)."""
    overrides = {
        "model.pretrained": pretrained,
        "model.text_positions_kept": 8,
        "model.text_stretch_factor": 4,
        "optim.weight_decay": 0.01,
        "optim.betas": "[0.9, 0.999]",
        "optim.eps": 1e-8,
        "optim.warmup_steps": 20,
        "optim.new_module_lr": args.new_module_lr,
        "loss.init_logit_scale": 4.6052,
        "loss.reset_logit_scale": "true",
        "smartclip.lambda_sparsity": args.lambda_sparsity,
    }
    return [item for k, v in overrides.items() for item in ("--set", f"{k}={v}")]


def train_run(name: str, argv: list[str], workdir: Path) -> tuple[str, float]:
    """(run directory, seconds it took); a finished run is reused."""
    run_dir, start = workdir / "runs" / name, time.monotonic()
    if not (run_dir / "done.json").exists():
        train.main(argv + ["--run-name", name])
        (run_dir / "done.json").write_text(json.dumps({"seconds": time.monotonic() - start}))
    return str(run_dir), json.loads((run_dir / "done.json").read_text())["seconds"]


def evaluate_run(run_dir: str, eval_root: Path, out: Path, scorer: str) -> tuple[dict, float]:
    """(report, seconds it took); a finished report is reused."""
    start = time.monotonic()
    if not (out / "seconds.json").exists():
        evaluate.main(
            [
                "--checkpoint",
                run_dir,
                "--output",
                str(out),
                "--scorer",
                scorer,
                "--zeroshot",
                f"zeroshot={eval_root / 'zeroshot'}",
                "--retrieval",
                f"short={eval_root / 'retrieval' / 'dataset_karpathy.json'}",
                "--long-retrieval",
                f"long={eval_root / 'long'}",
            ]
        )
        (out / "seconds.json").write_text(json.dumps({"seconds": time.monotonic() - start}))
    return json.loads((out / "report.json").read_text()), json.loads((out / "seconds.json").read_text())["seconds"]


def summarize(report: dict) -> dict:
    long, short = report["retrieval"]["long"], report["retrieval"]["short"]
    return {
        "long I2T R@1": long["text_retrieval_recall@1"],
        "long T2I R@1": long["image_retrieval_recall@1"],
        "zero-shot top-1": report["zeroshot"]["zeroshot"]["top1"],
        "short I2T R@1": short["text_retrieval_recall@1"],
        "short T2I R@1": short["image_retrieval_recall@1"],
    }


def format_table(rows: dict[str, list[dict]]) -> str:
    """Mean over seeds per model (and the spread when there are several seeds)."""
    columns = list(next(iter(rows.values()))[0])
    lines = ["| model | seeds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, runs in rows.items():
        cells = []
        for c in columns:
            values = [r[c] for r in runs]
            spread = f" ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else ""
            cells.append(f"{sum(values) / len(values):.3f}{spread}")
        lines.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plan_runs(args, build_uri: str, workdir: Path) -> tuple[dict[str, list[tuple[str, str]]], float]:
    """{model label: [(run directory, scorer) per seed]} and the training seconds, training
    what is not trained yet: the short-caption pretrain once, each fine-tune per seed."""
    pretrained, seconds = train_run(
        "pretrain-short",
        common_flags(args, build_uri, workdir, args.pretrain_epochs, args.pretrain_lr, args.seed)
        + ["--method", "clip", "--set", "data.caption_policy=short"],
        workdir,
    )
    runs = {"pretrained (short captions)": [(pretrained, "plain")]}
    for method, extra in FINETUNES.items():
        for seed in args.finetune_seeds:
            argv = common_flags(args, build_uri, workdir, args.finetune_epochs, args.finetune_lr, seed)
            run_dir, took = train_run(
                f"finetune-{method}-s{seed}",
                argv + ["--method", method] + extra + finetune_flags(args, pretrained),
                workdir,
            )
            runs.setdefault(f"+ {method} fine-tune", []).append((run_dir, "plain"))
            seconds += took
    runs["+ smartclip fine-tune, masked scorer"] = [(d, "masked") for d, _ in runs["+ smartclip fine-tune"]]
    return runs, seconds


def main(argv=None) -> dict:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    build_uri = ensure_demo_build(workdir, args.n_images)
    eval_root = workdir / f"corpus-{args.n_images}" / "eval"
    runs, train_seconds = plan_runs(args, build_uri, workdir)
    rows, eval_seconds = {}, 0.0
    for name, entries in runs.items():
        for run_dir, scorer in entries:
            out = workdir / "reports" / f"{Path(run_dir).name}-{scorer}"
            report, took = evaluate_run(run_dir, eval_root, out, scorer)
            rows.setdefault(name, []).append(summarize(report))
            eval_seconds += took
    print(
        f"\n{args.n_images} images, batch {args.batch_size}, 1 worker; pretrain {args.pretrain_epochs} epochs "
        f"(lr {args.pretrain_lr}); each fine-tune {args.finetune_epochs} epochs, seeds {args.finetune_seeds} "
        f"(towers lr {args.finetune_lr}, mask network lr {args.new_module_lr}, "
        f"λ_sparsity {args.lambda_sparsity}); "
        f"training {train_seconds:.0f} s + evaluation {eval_seconds:.0f} s (as measured when each ran)\n"
        f"{format_table(rows)}"
    )
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
