"""The topology paper's sharpest claims at our scale, on the demo corpus (Tables 3-4 of "Design
of the topology for contrastive visual-textual alignment"; docs/methods/topology.md §8):

1. Table 3, last block: the logit scale fixed at s = 1 and not learned. The paper: the sphere
   collapses (ZS 4.0), oblique −tr Ob(64, 8) still trains (21.2), Euclidean is unaffected (29.5).
2. Tables 3-4: learned temperature (t init 2.64, cap 100 for every row as in the ablation):
   sphere vs Ob(n, 8) vs Multi(n, 8) on zero-shot and retrieval.

    python benchmarks/reproduce_topology.py [--steps 150] [--seeds 0 1 2] [--out topology_repro]

Every row trains the same tower (`clip-tiny-p8-64-ctx48`, d = 128, so Ob(16, 8) and
Multi(16, 8)) on the same demo images, captions, batch order and steps, from the same seeds;
only the topology (and the temperature rule of its block) changes. Training is the project's
model, objective, optimiser and `train_step`, in this process (the data path is not what is
compared: images are decoded once, resized to 64 px, no augmentation, one caption of each
image's group drawn per step). Evaluation is the project's: zero-shot top-1 on the demo's
40-class split with the topology's template rule, Karpathy-layout retrieval R@1 both ways with
its similarity. Each row is reported as the mean over seeds and, against the sphere of the same
block, the paired difference (same seed) with its standard error (std / sqrt(seeds)). Whatever
the numbers show is what is printed.

Budget: 18 runs (2 blocks x 3 rows x 3 seeds). At the default 150 steps the runs took 138-296 s
each on 2 cores, 55 minutes in all, with the test suite sharing the machine for part of it
(about 140 s per run alone); about 250 steps is the most that fits 90 minutes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.inprocess import (
    ARCH,
    EvalData,
    add_training_arguments,
    paired_against,
    prepare_demo,
    train_from_scratch,
    write_results,
)
from scoring.retrieval import compute_retrieval_recall
from scoring.zeroshot import compute_zeroshot_metrics
from training.towers import build_tokenizer

FIXED = {"loss.init_logit_scale": 0.0, "loss.learn_temperature": False}  # s = 1, not learned
LEARNED = {"loss.init_logit_scale": 2.64, "loss.max_logit_scale": 100.0}  # the ablation's setting
BLOCKS = {
    "fixed s=1": {
        "sphere": {},
        "oblique Ob(16,8)": {"topology.kind": "oblique", "topology.m": 8},
        "euclidean": {"topology.kind": "euclidean"},
    },
    "learned s": {
        "sphere": {},
        "oblique Ob(16,8)": {"topology.kind": "oblique", "topology.m": 8},
        "multi Multi(16,8)": {"topology.kind": "multi", "topology.m": 8},
    },
}
METRICS = ("zeroshot_top1", "i2t_r1", "t2i_r1")


@torch.no_grad()
def evaluate(model, tokenizer, data: EvalData) -> dict:
    model.eval()
    topology = model.topology
    prompts = model.embed_text(tokenizer(data.prompts)).double().numpy()
    prompts = prompts.reshape(data.zeroshot.n_classes, len(data.zeroshot.templates), -1)
    logits = topology.class_scores(model.embed_image(data.zs_images).double().numpy(), prompts)
    top1 = compute_zeroshot_metrics(logits, data.zeroshot.labels)["top1"]
    images = model.embed_image(data.rt_images).double().numpy()
    texts = model.embed_text(tokenizer(data.retrieval.captions)).double().numpy()
    recall = compute_retrieval_recall(topology.score(images, texts), data.retrieval.text_to_image)
    model.train()
    return {
        "zeroshot_top1": top1,
        "i2t_r1": recall["text_retrieval_recall@1"],
        "t2i_r1": recall["image_retrieval_recall@1"],
    }


def train_row(overrides: dict, seed: int, images, groups, data: EvalData, args) -> dict:
    model, stats = train_from_scratch(
        {"optim.lr": args.lr, "optim.warmup_steps": args.warmup, **overrides},
        seed,
        images,
        groups,
        args.steps,
        args.batch_size,
    )
    return {**evaluate(model, build_tokenizer(ARCH), data), **stats}


def summarize(results: dict, seeds: list[int]) -> list[dict]:
    """Rows: mean per metric over seeds and, against the block's sphere, the paired
    difference's mean and standard error."""
    rows = []
    for block, variants in results.items():
        sphere = variants["sphere"]
        for name, runs in variants.items():
            row = {"block": block, "row": name}
            row.update({metric: paired_against(runs, sphere, seeds, metric) for metric in METRICS})
            row["logit_scale"] = float(np.mean([runs[s]["logit_scale"] for s in seeds]))
            rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    head = (
        f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.steps} steps of batch "
        f"{args.batch_size}, {ARCH}; value: mean over seeds; Δ: paired difference to the block's sphere "
        "± standard error\n\n"
    )
    lines = [
        "| block | row | zero-shot top-1 (Δ) | I2T R@1 (Δ) | T2I R@1 (Δ) | final s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        cells = [
            f"{100 * m:.1f} ({100 * d:+.1f} ± {100 * se:.1f})" if r["row"] != "sphere" else f"{100 * m:.1f}"
            for m, d, se in (r[k] for k in METRICS)
        ]
        lines.append(f"| {r['block']} | {r['row']} | {' | '.join(cells)} | {r['logit_scale']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, steps=150, out="topology_repro")
    args = p.parse_args(argv)
    out, images, groups, data = prepare_demo(args)
    results: dict = {}
    for block, variants in BLOCKS.items():
        for name, overrides in variants.items():
            for seed in args.seeds:
                run = train_row(
                    {**(FIXED if block.startswith("fixed") else LEARNED), **overrides}, seed, images, groups, data, args
                )
                results.setdefault(block, {}).setdefault(name, {})[seed] = run
                print(json.dumps({"block": block, "row": name, "seed": seed, **run}), flush=True)
    rows = summarize(results, args.seeds)
    write_results(out, markdown(rows, args), {"runs": results, "rows": rows, "args": vars(args)})
    return rows


if __name__ == "__main__":
    main()
