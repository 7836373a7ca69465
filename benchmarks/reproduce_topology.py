"""The topology paper's sharpest claims at our scale, on the demo corpus (Tables 3-4 of "Design
of the topology for contrastive visual-textual alignment"; METHODS.md §3.8):

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
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from evaluation.datasets import load_image_folder, load_karpathy
from evaluation.datasets.files import read_image
from evaluation.tasks.retrieval import compute_retrieval_recall
from evaluation.tasks.zeroshot import compute_zeroshot_metrics, fill_templates
from pipelines.demo_corpus import write_demo_corpus
from training import transforms
from training.batches import IMAGES, TEXTS
from training.config import apply_overrides
from training.inference import EvalPreprocess
from training.loop import LoopSettings, seed_step, train_step
from training.methods import build_method_config
from training.model import build_training_model
from training.objectives import build_objective
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer

ARCH = "clip-tiny-p8-64-ctx48"
IMAGE_SIZE = 64
FIXED = {"loss.init_logit_scale": 0.0, "loss.learn_temperature": False}  # s = 1, not learned
LEARNED = {"loss.init_logit_scale": 2.64, "loss.max_logit_scale": 100.0}  # the ablation's setting
BLOCKS = {
    "fixed s=1": {"sphere": {}, "oblique Ob(16,8)": {"topology.kind": "oblique", "topology.m": 8},
                  "euclidean": {"topology.kind": "euclidean"}},
    "learned s": {"sphere": {}, "oblique Ob(16,8)": {"topology.kind": "oblique", "topology.m": 8},
                  "multi Multi(16,8)": {"topology.kind": "multi", "topology.m": 8}},
}
METRICS = ("zeroshot_top1", "i2t_r1", "t2i_r1")


def load_training_pairs(corpus) -> tuple[torch.Tensor, list[list[str]]]:
    """(N, 3, 64, 64) uint8 images of the training split and each image's caption group."""
    records = [json.loads(line) for line in (corpus.out_dir / "corpus.jsonl").read_text().splitlines()]
    images = []
    for record in records:
        rgb = transforms.decode_rgb((corpus.mirror_root / record["path"]).read_bytes())
        images.append(cv2.resize(rgb, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA))
    groups = [record["short_captions"] + [record["long_caption"]] for record in records]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), groups


class EvalData:
    def __init__(self, corpus):
        preprocess = EvalPreprocess(IMAGE_SIZE)
        self.zeroshot = load_image_folder(str(corpus.zeroshot_dir))
        self.retrieval = load_karpathy(str(corpus.retrieval_dir / "dataset_karpathy.json"))
        self.zs_images = torch.stack([preprocess(read_image(r)) for r in self.zeroshot.images])
        self.rt_images = torch.stack([preprocess(read_image(r)) for r in self.retrieval.images])
        self.prompts = [p for c in self.zeroshot.classnames for p in fill_templates(self.zeroshot.templates, c)]


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
    return {"zeroshot_top1": top1, "i2t_r1": recall["text_retrieval_recall@1"],
            "t2i_r1": recall["image_retrieval_recall@1"]}


def train_row(overrides: dict, seed: int, images, groups, data: EvalData, args) -> dict:
    config = apply_overrides(build_method_config("clip"), {
        "model.arch": ARCH, "optim.lr": args.lr, "optim.warmup_steps": args.warmup, "run.seed": seed,
        **overrides})
    torch.manual_seed(seed)
    model = build_training_model(config).train()
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps, args.steps)
    objective = build_objective(config.loss, config.smartclip, 0, 1, model.topology)
    tokenizer = build_tokenizer(ARCH)
    tokens = [tokenizer(group) for group in groups]
    settings = LoopSettings(0, args.steps, seed, 0, 1, torch.device("cpu"))
    rng, start, losses = np.random.default_rng(seed), time.perf_counter(), []
    for step in range(args.steps):
        index = rng.choice(len(groups), args.batch_size, replace=False)
        texts = torch.stack([tokens[i][rng.integers(len(groups[i]))] for i in index])
        seed_step(model, seed, step, 0)
        metrics = train_step(model, objective, optimizer, scheduler, {IMAGES: images[index], TEXTS: texts}, settings)
        losses.append(float(metrics["loss/total"]))
    return {**evaluate(model, tokenizer, data), "final_loss": float(np.mean(losses[-20:])),
            "logit_scale": float(model.tower.logit_scale.exp()), "train_s": time.perf_counter() - start}


def summarize(results: dict, seeds: list[int]) -> list[dict]:
    """Rows: mean per metric over seeds and, against the block's sphere, the paired
    difference's mean and standard error."""
    rows = []
    for block, variants in results.items():
        sphere = variants["sphere"]
        for name, runs in variants.items():
            row = {"block": block, "row": name}
            for metric in METRICS:
                values = np.array([runs[s][metric] for s in seeds])
                diffs = values - np.array([sphere[s][metric] for s in seeds])
                se = diffs.std(ddof=1) / np.sqrt(len(seeds)) if len(seeds) > 1 else float("nan")
                row[metric] = (float(values.mean()), float(diffs.mean()), float(se))
            row["logit_scale"] = float(np.mean([runs[s]["logit_scale"] for s in seeds]))
            rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    head = (f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.steps} steps of batch "
            f"{args.batch_size}, {ARCH}; value: mean over seeds; Δ: paired difference to the block's sphere "
            "± standard error\n\n")
    lines = ["| block | row | zero-shot top-1 (Δ) | I2T R@1 (Δ) | T2I R@1 (Δ) | final s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = [f"{100 * m:.1f} ({100 * d:+.1f} ± {100 * se:.1f})" if r["row"] != "sphere" else f"{100 * m:.1f}"
                 for m, d, se in (r[k] for k in METRICS)]
        lines.append(f"| {r['block']} | {r['row']} | {' | '.join(cells)} | {r['logit_scale']:.2f} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="topology_repro")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    corpus = write_demo_corpus(out / "corpus", n_images=args.n_images, seed=0)
    images, groups = load_training_pairs(corpus)
    data = EvalData(corpus)
    results: dict = {}
    for block, variants in BLOCKS.items():
        for name, overrides in variants.items():
            for seed in args.seeds:
                run = train_row({**(FIXED if block.startswith("fixed") else LEARNED), **overrides}, seed,
                                images, groups, data, args)
                results.setdefault(block, {}).setdefault(name, {})[seed] = run
                print(json.dumps({"block": block, "row": name, "seed": seed, **run}), flush=True)
    rows = summarize(results, args.seeds)
    table = markdown(rows, args)
    print(table)
    (out / "results.json").write_text(json.dumps({"runs": results, "rows": rows, "args": vars(args)}, indent=1))
    (out / "table.md").write_text(table)
    return rows


if __name__ == "__main__":
    main()
