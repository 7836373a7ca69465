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
with the masked scorer. Prints one table; writes results.json under --workdir.
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
FINETUNES = {"clip": ["--set", "data.caption_policy=mix"], "longclip": [],
             "smartclip": ["--set", "data.caption_policy=mix"]}


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
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def common_flags(args, build_uri: str, workdir: Path, epochs: int, lr: float) -> list[str]:
    return ["--data", build_uri, "--arch", ARCH, "--num-workers", "1", "--batch-size", str(args.batch_size),
            "--epochs", str(epochs), "--lr", str(lr), "--seed", str(args.seed),
            "--storage", str(workdir / "runs"), "--log-every", "20", "--checkpoint-every", "100000"]


def finetune_flags(args, pretrained: str) -> list[str]:
    """Long-CLIP's recipe, identical for the three fine-tunes (the `clip` method would
    otherwise keep its from-scratch defaults)."""
    overrides = {"model.pretrained": pretrained, "model.text_positions_kept": 8, "model.text_stretch_factor": 4,
                 "optim.weight_decay": 0.01, "optim.betas": "[0.9, 0.999]", "optim.eps": 1e-8,
                 "optim.warmup_steps": 20, "optim.new_module_lr": args.new_module_lr,
                 "loss.init_logit_scale": 4.6052, "loss.reset_logit_scale": "true",
                 "smartclip.lambda_sparsity": args.lambda_sparsity}
    return [item for k, v in overrides.items() for item in ("--set", f"{k}={v}")]


def train_run(name: str, argv: list[str], workdir: Path) -> str:
    run_dir = workdir / "runs" / name
    if not (run_dir / "done").exists():
        train.main(argv + ["--run-name", name])
        (run_dir / "done").write_text("")
    return str(run_dir)


def evaluate_run(run_dir: str, eval_root: Path, out: Path, scorer: str) -> dict:
    if (out / "report.json").exists():  # runs and reports are reused: delete --workdir to redo
        return json.loads((out / "report.json").read_text())
    return evaluate.main(["--checkpoint", run_dir, "--output", str(out), "--scorer", scorer,
                          "--zeroshot", f"zeroshot={eval_root / 'zeroshot'}",
                          "--retrieval", f"short={eval_root / 'retrieval' / 'dataset_karpathy.json'}",
                          "--long-retrieval", f"long={eval_root / 'long'}"])


def summarize(report: dict) -> dict:
    long, short = report["retrieval"]["long"], report["retrieval"]["short"]
    return {"long I2T R@1": long["text_retrieval_recall@1"], "long T2I R@1": long["image_retrieval_recall@1"],
            "zero-shot top-1": report["zeroshot"]["zeroshot"]["top1"],
            "short I2T R@1": short["text_retrieval_recall@1"], "short T2I R@1": short["image_retrieval_recall@1"]}


def format_table(rows: dict[str, dict]) -> str:
    columns = list(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args, start = parse_args(argv), time.monotonic()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    build_uri = ensure_demo_build(workdir, args.n_images)
    eval_root = workdir / f"corpus-{args.n_images}" / "eval"
    pretrained = train_run("pretrain-short", common_flags(args, build_uri, workdir, args.pretrain_epochs,
                                                          args.pretrain_lr) + ["--method", "clip",
                                                          "--set", "data.caption_policy=short"], workdir)
    runs = {"pretrained (short captions)": (pretrained, "plain")}
    for method, extra in FINETUNES.items():
        argv = common_flags(args, build_uri, workdir, args.finetune_epochs, args.finetune_lr)
        runs[f"+ {method} fine-tune"] = (train_run(f"finetune-{method}", argv + ["--method", method] + extra
                                                   + finetune_flags(args, pretrained), workdir), "plain")
    runs["+ smartclip fine-tune, masked scorer"] = (runs["+ smartclip fine-tune"][0], "masked")
    rows = {name: summarize(evaluate_run(run_dir, eval_root, workdir / "reports" / f"{i}-{scorer}", scorer))
            for i, (name, (run_dir, scorer)) in enumerate(runs.items())}
    table = format_table(rows)
    print(f"\n{args.n_images} images, batch {args.batch_size}, 1 worker; pretrain {args.pretrain_epochs} epochs "
          f"(lr {args.pretrain_lr}), each fine-tune {args.finetune_epochs} epochs (towers lr {args.finetune_lr}, "
          f"mask network lr {args.new_module_lr}, λ_sparsity {args.lambda_sparsity}); "
          f"{time.monotonic() - start:.0f} s in all\n{table}")
    (workdir / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
