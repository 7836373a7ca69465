"""Cross the Gap at our scale, on the demo corpus (§5 and the §5.6 fine-tuning experiment;
docs/methods/inversion.md §3-6): does inverting a query into the other modality help intra-modal retrieval
on a small CLIP with a modality gap, and does the gain go away when projection-only fine-tuning
with a fixed, higher temperature narrows the gap?

    python -m benchmarks.reproduce_crossgap [--steps 300] [--seeds 0 1 2] [--out crossgap_repro]

Per seed, one CLIP (`clip-tiny-p8-64-ctx48`, learned temperature) is trained in process on the
demo corpus (benchmarks/inprocess.py), then copied into two projection-only fine-tunes
(`model.trainable=projections`, the temperature fixed and not learned), as in the paper's
§5.6: τ = 1 (logit scale 1: "no gap") and the reference τ = 0.01 (scale 100, CLIP's
pre-training value, so that what changes between the two is the temperature, not the
fine-tuning). Each of the three models is then measured on the demo's held-out data:

- image->image mAP on the 40-class zero-shot split, the same split as gallery with each query
  removed (the CUB / SOP protocol): native queries (intra-modal) against OTI queries (k = 1,
  150 steps; inter-modal), on the first `--oti-queries` images;
- the classification control: zero-shot top-1 of the native images against that of their OTI
  features (text against text: the paper expects it to fall);
- text->text mAP on the Karpathy-layout retrieval set (first caption queries, the other
  captions as gallery): native against OVI queries (k = 1, 1000 steps), on the first
  `--ovi-queries` images' first captions;
- the modality gap over the retrieval set's (image, caption) pairs (Liang et al.).

Reported per model: each metric's mean over seeds ± standard error, and the paired difference
inverted − native (same seed, same queries) ± its standard error. Whatever it shows is printed.
Budget (2 cores): about 11-12 minutes per seed at the defaults, inversions included.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch

from benchmarks.inprocess import (
    ARCH,
    EvalData,
    add_training_arguments,
    clip_config,
    mean_se,
    prepare_demo,
    train,
    train_from_scratch,
    write_results,
)
from evaluation.inversion import InversionConfig, oti_features, ovi_features
from evaluation.tasks.intra_modal import MAP_KEY, compute_modality_gap, compute_retrieval_metrics, split_first_caption
from scoring.zeroshot import compute_zeroshot_metrics
from training.model import build_training_model
from training.towers import build_tokenizer

BASE = {"loss.init_logit_scale": 2.64}  # CLIP's 1/0.07, learned (capped at 100)
FINE_TUNES = {"fine-tuned τ=1 (no gap)": 1.0, "fine-tuned τ=0.01 (reference)": 100.0}  # logit scale
PAIRS = (("i2i_mAP", "i2i_mAP_oti"), ("zeroshot_top1", "zeroshot_top1_oti"), ("t2t_mAP", "t2t_mAP_ovi"))


def fine_tune(base, logit_scale: float, seed: int, images, groups, args):
    """A copy of `base` with only its two projections trained, the logit scale fixed."""
    config = clip_config(
        {
            "model.trainable": "projections",
            "loss.learn_temperature": False,
            "loss.init_logit_scale": float(np.log(logit_scale)),
            "loss.max_logit_scale": 100.0,
            "optim.lr": args.fine_tune_lr,
            "optim.warmup_steps": 10,
        },
        seed,
    )
    model = build_training_model(config)
    state = copy.deepcopy(base.state_dict())
    state["tower.logit_scale"] = model.tower.logit_scale.detach().clone()
    model.load_state_dict(state)
    return model, train(model, config, images, groups, args.fine_tune_steps, args.batch_size)


def inverted(kind: str, model, tokenizer, targets: torch.Tensor, identities: list[str], args) -> np.ndarray:
    config, batch = InversionConfig(kind=kind, steps=getattr(args, f"{kind}_steps")), args.batch
    parts = []
    for start in range(0, len(identities), batch):
        rows, ids = targets[start : start + batch].float(), identities[start : start + batch]
        parts.append(
            oti_features(model.tower, tokenizer, rows, ids, config)
            if kind == "oti"
            else ovi_features(model.tower, rows, ids, config)
        )
    return torch.cat(parts).double().numpy()


@torch.no_grad()
def embed(model, tokenizer, data: EvalData) -> dict:
    first, _ = split_first_caption(data.retrieval.text_to_image)
    return {
        "zs": model.embed_image(data.zs_images),
        "prompts": model.embed_text(tokenizer(data.prompts)),
        "rt": model.embed_image(data.rt_images),
        "captions": model.embed_text(tokenizer(data.retrieval.captions)),
        "first": first,
    }


def measure(model, data: EvalData, args) -> dict:
    """Native against inverted, on the same queries and galleries."""
    tokenizer, score = build_tokenizer(ARCH), model.topology.score
    f = embed(model, tokenizer, data)
    zs = f["zs"].double().numpy()
    labels, n_q = data.zeroshot.labels, min(args.oti_queries, len(data.zeroshot.images))
    oti = inverted("oti", model, tokenizer, f["zs"][:n_q], [str(r) for r in data.zeroshot.images[:n_q]], args)
    ids = np.arange(len(labels))

    def i2i(queries):
        return compute_retrieval_metrics(queries, labels[:n_q], zs, labels, score, query_ids=ids[:n_q], gallery_ids=ids)

    prompts = f["prompts"].double().numpy().reshape(data.zeroshot.n_classes, len(data.zeroshot.templates), -1)

    def top1(images):
        return compute_zeroshot_metrics(model.topology.class_scores(images, prompts), labels[:n_q])["top1"]

    captions, owners = f["captions"].double().numpy(), data.retrieval.text_to_image
    first = f["first"][: args.ovi_queries]
    gallery = np.setdiff1d(np.arange(len(owners)), f["first"])
    ovi = inverted("ovi", model, tokenizer, f["captions"][first], [data.retrieval.captions[i] for i in first], args)

    def t2t(queries):
        return compute_retrieval_metrics(queries, owners[first], captions[gallery], owners[gallery], score)[MAP_KEY]

    return {
        "i2i_mAP": i2i(zs[:n_q])[MAP_KEY],
        "i2i_mAP_oti": i2i(oti)[MAP_KEY],
        "zeroshot_top1": top1(zs[:n_q]),
        "zeroshot_top1_oti": top1(oti),
        "t2t_mAP": t2t(captions[first]),
        "t2t_mAP_ovi": t2t(ovi),
        "modality_gap": compute_modality_gap(f["rt"].double().numpy(), captions, owners),
    }


def run_seed(seed: int, images, groups, data: EvalData, args) -> dict:
    base, stats = train_from_scratch(
        {**BASE, "optim.lr": args.lr, "optim.warmup_steps": args.warmup},
        seed,
        images,
        groups,
        args.steps,
        args.batch_size,
    )
    runs = {"trained CLIP": {**stats, **timed(measure, base, data, args)}}
    for name, logit_scale in FINE_TUNES.items():
        model, stats = fine_tune(base, logit_scale, seed, images, groups, args)
        runs[name] = {**stats, **timed(measure, model, data, args)}
    return runs


def timed(fn, *a) -> dict:
    start = time.perf_counter()
    return {**fn(*a), "measure_s": time.perf_counter() - start}


def markdown(results: dict, args) -> str:
    seeds = sorted(results)
    head = (
        f"{len(seeds)} seeds ({', '.join(map(str, seeds))}); {ARCH}, {args.steps} steps of batch "
        f"{args.batch_size}, fine-tunes {args.fine_tune_steps} steps (projections only, lr "
        f"{args.fine_tune_lr:g}); OTI on {args.oti_queries} query images, OVI on {args.ovi_queries} "
        "query captions; mean ± standard error over seeds, Δ = inverted − native paired by seed\n\n"
    )
    lines = [
        "| model | gap | i2i mAP native | OTI (Δ) | zero-shot native | OTI (Δ) | t2t mAP native | OVI (Δ) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for model in results[seeds[0]]:
        runs = [results[s][model] for s in seeds]
        cells = ["{:.3f} ± {:.3f}".format(*mean_se([r["modality_gap"] for r in runs]))]
        for native, inv in PAIRS:
            n, n_se = mean_se([100 * r[native] for r in runs])
            i, _ = mean_se([100 * r[inv] for r in runs])
            d, d_se = mean_se([100 * (r[inv] - r[native]) for r in runs])
            cells += [f"{n:.1f} ± {n_se:.1f}", f"{i:.1f} ({d:+.1f} ± {d_se:.1f})"]
        lines.append(f"| {model} | {' | '.join(cells)} |")
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(p, steps=300, out="crossgap_repro")
    p.add_argument("--fine-tune-steps", type=int, default=100)
    p.add_argument("--fine-tune-lr", type=float, default=1e-3)
    p.add_argument("--oti-queries", type=int, default=128)
    p.add_argument("--ovi-queries", type=int, default=32)
    p.add_argument("--oti-steps", type=int, default=0, help="0: the paper's 150")
    p.add_argument("--ovi-steps", type=int, default=0, help="0: the paper's 1000")
    p.add_argument("--batch", type=int, default=16, help="queries inverted at once (16 is the CPU optimum)")
    args = p.parse_args(argv)
    out, images, groups, data = prepare_demo(args)
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(seed, images, groups, data, args)
        for model, run in results[seed].items():
            print(json.dumps({"seed": seed, "model": model, **run}), flush=True)
    write_results(out, markdown(results, args), {"runs": results, "args": vars(args)})
    return results


if __name__ == "__main__":
    main()
