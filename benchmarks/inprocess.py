"""In-process training on the demo corpus, shared by the demo-scale reproductions
(`reproduce_topology`, `reproduce_crossgap`): the project's model, objective, optimiser and
`train_step`, in this process, on images decoded once and resized to 64 px (no augmentation),
one caption of each image's group drawn per step. What the reproductions compare is the
method, not the data path, so every row sees the same images, captions and batch order."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from evaluation.datasets import load_image_folder, load_karpathy
from scoring.sets.files import read_image
from scoring.zeroshot import class_prompts
from pipelines.demo_corpus import write_demo_corpus
from training import transforms
from training.batches import IMAGES, TEXTS
from training.config import TrainConfig, apply_overrides
from training.inference import EvalPreprocess
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer

ARCH = "clip-tiny-p8-64-ctx48"  # d = 128, ViT (OVI and multi-[CLS] need one)
IMAGE_SIZE = 64


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
    """The demo's held-out zero-shot split and Karpathy-layout retrieval set, preprocessed once."""

    def __init__(self, corpus):
        preprocess = EvalPreprocess(IMAGE_SIZE)
        self.zeroshot = load_image_folder(str(corpus.zeroshot_dir))
        self.retrieval = load_karpathy(str(corpus.retrieval_dir / "dataset_karpathy.json"))
        self.zs_images = torch.stack([preprocess(read_image(r)) for r in self.zeroshot.images])
        self.rt_images = torch.stack([preprocess(read_image(r)) for r in self.retrieval.images])
        self.prompts = class_prompts(self.zeroshot)


def clip_config(overrides: dict, seed: int, method: str = "clip") -> TrainConfig:
    return apply_overrides(build_method_config(method), {"model.arch": ARCH, "run.seed": seed, **overrides})


def train(
    model, config: TrainConfig, images: torch.Tensor, groups: list[list[str]], steps: int, batch_size: int
) -> dict:
    """`steps` steps of `config` on `model` (in place), batches drawn from the run seed; returns
    the mean loss of the last 20 steps (and of every logged loss and CIBR term), the final
    logit scale and the wall time."""
    seed = config.run.seed
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps, steps)
    objective = build_training_objective(config, 0, 1, model, torch.device("cpu"))
    tokenizer = build_tokenizer(config.model.arch)
    tokens = [tokenizer(group) for group in groups]
    settings = LoopSettings(0, steps, seed, 0, 1, torch.device("cpu"))
    rng, start, losses, history = np.random.default_rng(seed), time.perf_counter(), [], []
    model.train()
    for step in range(steps):
        index = rng.choice(len(groups), batch_size, replace=False)
        texts = torch.stack([tokens[i][rng.integers(len(groups[i]))] for i in index])
        seed_step(model, seed, step, 0)
        metrics = train_step(
            model, objective, optimizer, scheduler, {IMAGES: images[index], TEXTS: texts}, settings, step=step
        )
        losses.append(float(metrics["loss/total"]))
        history.append({k: float(v) for k, v in metrics.items() if k.startswith(("loss/", "cibr/"))})
    model.eval()
    last = {k: float(np.mean([h[k] for h in history[-20:]])) for k in history[-1]} if history else {}
    return {
        "final_loss": float(np.mean(losses[-20:])),
        "logit_scale": float(model.tower.logit_scale.detach().exp()),
        "train_s": time.perf_counter() - start,
        "last20": last,
    }


def train_from_scratch(overrides: dict, seed: int, images, groups, steps: int, batch_size: int):
    """(model, stats): a model built from `overrides` under `seed`, trained `steps` steps."""
    config = clip_config(overrides, seed)
    torch.manual_seed(seed)
    model = build_training_model(config)
    return model, train(model, config, images, groups, steps, batch_size)


def add_training_arguments(p: argparse.ArgumentParser, steps: int, out: str) -> None:
    """The options every in-process reproduction shares (data, schedule, seeds, threads)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--n-images", type=int, default=3000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=out)


def prepare_demo(args) -> tuple[Path, torch.Tensor, list[list[str]], EvalData]:
    """(output folder, training images, caption groups, held-out data) on a fresh demo corpus."""
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    corpus = write_demo_corpus(out / "corpus", n_images=args.n_images, seed=0)
    images, groups = load_training_pairs(corpus)
    return out, images, groups, EvalData(corpus)


def write_results(out: Path, table: str, results: dict) -> None:
    print(table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "table.md").write_text(table)


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (NaN for a single value)."""
    values = np.asarray(values, dtype=float)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return float(values.mean()), float(se)


def paired_against(runs: dict, control: dict, seeds: list[int], metric: str) -> tuple[float, float, float]:
    """(mean over seeds, mean paired difference to `control` (same seed), its standard error)
    of `metric`; runs and control map seed -> results."""
    values = np.array([runs[s][metric] for s in seeds])
    diff, se = mean_se(values - np.array([control[s][metric] for s in seeds]))
    return float(values.mean()), diff, se
