"""Training-step time of CLIP-PGS against FLIP at the same mask ratio, on the same model and
batch, and the selection's own share of the PGS step (the paper claims < 3 % overall).

    python benchmarks/bench_pgs.py [--arch clip-tiny-p8-64] [--batch-size 128] [--device cpu]
    python benchmarks/bench_pgs.py --device cuda --arch ViT-B-16 --batch-size 256

Steps of the variants are interleaved and both the median and the minimum are printed: on
a shared machine the minimum is the steadier figure. "selection" times the selector alone
(similarities, OTN, seeds, ranking) on the step's
tokens; the rest of PGS's cost is its attention mask and the tokens it keeps in the sequence
but hides: with the default `batch_min` compaction only what the batch does not share
(PGS0.3 paper mode), with `static` (".../static", no host read) all of each image's
data-dependent drop.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from training.batches import EDGE_SCORES, IMAGES, TEXTS
from training.config import apply_overrides, temperature_of
from training.methods.clip.loss import ContrastiveLoss
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.methods.pgs.attention import embed_patch_tokens
from training.model import build_model, tower_geometry
from training.optim import build_optimizer, build_scheduler
from training.towers import build_tokenizer
from training.transforms import normalize_image_tensor


def synthetic_batch(arch: str, image_size: int, num_patches: int, batch_size: int) -> dict:
    rng = np.random.default_rng(0)
    captions = [f"a {c} shape number {i}" for i, c in enumerate(rng.choice(["red", "blue"], batch_size))]
    return {
        IMAGES: rng.integers(0, 256, (batch_size, 3, image_size, image_size), dtype=np.uint8),
        EDGE_SCORES: rng.random((batch_size, num_patches), dtype=np.float32) * 100,
        TEXTS: build_tokenizer(arch)(captions).numpy(),
    }


def build_variant(label: str, args):
    """(label, model) for "flip@r" or "pgs0.x/<mode>[/<compaction>]"."""
    if label.startswith("flip@"):
        config = apply_overrides(build_method_config("flip"), {"masking.ratio": float(label[5:])})
    else:
        method, mode, *compaction = label.split("/")
        config = apply_overrides(
            build_method_config(method), {"pgs.mode": mode, "pgs.compaction": (compaction or ["batch_min"])[0]}
        )
    config = apply_overrides(config, {"model.arch": args.arch})
    torch.manual_seed(0)
    return config, build_model(
        config.model, config.masking, temperature_of(config.loss, config.topology), pgs=config.pgs
    ).to(args.device)


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


class Variant:
    """One model with its optimizer on the shared batch; `step()` times one training step."""

    def __init__(self, label: str, args):
        self.label, self.device = label, torch.device(args.device)
        config, self.model = build_variant(label, args)
        self.optimizer = build_optimizer(self.model, config.optim)
        self.scheduler = build_scheduler(self.optimizer, 10, 10_000)
        self.settings = LoopSettings(0, 10_000, 0, 0, 1, self.device, bf16=self.device.type == "cuda")
        image_size, patch_size = tower_geometry(self.model)
        self.batch = synthetic_batch(args.arch, image_size, (image_size // patch_size) ** 2, args.batch_size)
        self.step_times, self.selection_times = [], []

    def step(self, index: int) -> None:
        seed_step(self.model, 0, index, 0)
        self.step_times.append(
            timed(
                lambda: train_step(
                    self.model, ContrastiveLoss(), self.optimizer, self.scheduler, self.batch, self.settings, 0.5
                ),
                self.device,
            )
        )
        if self.model.token_selector is not None:
            self.selection_times.append(run_selection(self.model, self.batch, self.device, self.settings.bf16))

    def summary(self, warmup: int) -> dict:
        selection = self.selection_times[warmup:]
        return {
            "label": self.label,
            "step_s": float(np.median(self.step_times[warmup:])),
            "min_step_s": float(np.min(self.step_times[warmup:])),
            "selection_s": float(np.median(selection)) if selection else 0.0,
        }


def time_group(labels: tuple[str, ...], args) -> list[dict]:
    """Steps of the variants interleaved (round robin), so a machine whose load drifts
    (shared CPUs) slows every variant alike."""
    variants = [Variant(label, args) for label in labels]
    for index in range(args.warmup + args.steps):
        for variant in variants:
            variant.step(index)
    if args.profile_selection:
        for variant in variants[1:]:
            profile_selection(variant)
    return [v.summary(args.warmup) for v in variants]


def profile_selection(variant: Variant) -> None:
    """Where the selector's time goes: its operators with the most self time, one call (the
    inputs' transfer and patch embedding happen outside the profiled region)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = variant.device.type == "cuda"

    def profiled(fn, device):
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            timed(fn, device)
        return prof

    prof = run_selection(variant.model, variant.batch, variant.device, variant.settings.bf16, profiled)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(f"selection of {variant.label}, by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=48))


def run_selection(model, batch: dict, device: torch.device, bf16: bool, measure=None):
    """`measure(fn, device)` (default: `timed`) of the selector alone on the step's tokens."""
    images = normalize_image_tensor(torch.as_tensor(batch[IMAGES]).to(device))
    edges = torch.as_tensor(batch[EDGE_SCORES]).to(device)
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        tokens = embed_patch_tokens(model.tower.visual, images)[:, 1:]
        return (measure or timed)(lambda: model.token_selector(tokens, images, edges, 0.5), device)


VARIANTS = (
    ("flip@0.5", "pgs0.5/reference", "pgs0.5/paper"),
    ("flip@0.3", "pgs0.3/reference", "pgs0.3/paper", "pgs0.3/paper/static"),
)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--profile-selection", action="store_true", help="print the selector's operators by self time (torch.profiler)"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"{args.arch}, batch {args.batch_size}, {args.device} ({args.threads} thread(s)), "
        f"median of {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        f"{'variant':20s} {'ms/step':>9s} {'vs FLIP':>8s} {'min ms':>8s} {'vs FLIP':>8s} "
        f"{'selection ms':>13s} {'share of step':>14s}"
    )
    results = {}
    for group in VARIANTS:
        flip, *pgs = time_group(group, args)
        results.update({r["label"]: r for r in (flip, *pgs)})
        for r in (flip, *pgs):
            selection = "-" if r is flip else f"{r['selection_s'] * 1e3:.2f}"
            share = "-" if r is flip else f"{100 * r['selection_s'] / r['step_s']:.1f}%"
            print(
                f"{r['label']:20s} {r['step_s'] * 1e3:9.1f} {r['step_s'] / flip['step_s']:7.2f}x "
                f"{r['min_step_s'] * 1e3:8.1f} {r['min_step_s'] / flip['min_step_s']:7.2f}x "
                f"{selection:>13s} {share:>14s}"
            )
    return results


if __name__ == "__main__":
    main()
