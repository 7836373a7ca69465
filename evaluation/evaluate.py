"""Evaluate a checkpoint: zero-shot classification and image<->text retrieval, as its own
Ray job. Every image of every dataset is encoded in one Ray Data pass over encoder actors,
every text (class prompts, captions) in a second one; metrics are plain NumPy.

    python evaluation/evaluate.py --checkpoint runs/<run> --zeroshot demo/eval/zeroshot \
        --retrieval demo/eval/retrieval/dataset_karpathy.json --output reports/<run>
    ray job submit --working-dir . -- python evaluation/evaluate.py --checkpoint s3://... ...

A dataset can be named: `--zeroshot NAME=PATH`. Missing or unreadable datasets are listed
under "skipped" in the report instead of failing the job. Writes report.json and report.md
to --output (local folder or s3://).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from evaluation import encoders  # noqa: E402
from evaluation.datasets.classification import load_image_folder  # noqa: E402
from evaluation.datasets.retrieval import load_karpathy, load_long_caption_folder  # noqa: E402
from evaluation.report import write_report  # noqa: E402
from evaluation.tasks.retrieval import compute_retrieval_recall  # noqa: E402
from evaluation.tasks.zeroshot import build_zeroshot_weights, compute_zeroshot_metrics, fill_templates  # noqa: E402
from pipelines import ray_setup, storage  # noqa: E402
from training.inference import SCORERS, load_inference_model  # noqa: E402

log = logging.getLogger("evaluation")
LOADERS = {"zeroshot": load_image_folder, "retrieval": load_karpathy, "long_retrieval": load_long_caption_folder}
SECTION = {"zeroshot": "zeroshot", "retrieval": "retrieval", "long_retrieval": "retrieval"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint or run directory, local or s3://")
    p.add_argument("--zeroshot", nargs="*", default=[], help="image-folder classification sets")
    p.add_argument("--retrieval", nargs="*", default=[], help="Karpathy-layout JSON files (test split)")
    p.add_argument("--long-retrieval", nargs="*", default=[], help="Urban1k-layout folders")
    p.add_argument("--output", required=True, help="report folder, local or s3://")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-encoders", type=int, default=1, help="Ray Data encoder actors")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--scorer", default="plain", choices=SCORERS,
                   help="plain cosine (default) or SmartCLIP's masked cosine (training/inference.py)")
    p.add_argument("--ray-address", default=None)
    return p.parse_args(argv)


@dataclass
class Task:
    """One dataset to score, with the slices of the shared image and text lists it owns."""
    kind: str
    name: str
    dataset: object
    images: slice = None  # set by assign_slices
    texts: slice = None


def load_tasks(args: argparse.Namespace, skipped: dict) -> list[Task]:
    tasks = []
    for kind, loader in LOADERS.items():
        for spec in getattr(args, kind):
            name, _, path = spec.rpartition("=")
            try:
                dataset = loader(path)
            except (FileNotFoundError, ValueError) as err:  # skip it, never fail the suite
                skipped[name or path] = f"{type(err).__name__}: {err}"
                continue
            tasks.append(Task(kind, name or dataset.name, dataset))
    return tasks


def task_texts(task: Task) -> list[str]:
    if task.kind == "zeroshot":  # every class name in every template, class-major
        return [p for c in task.dataset.classnames for p in fill_templates(task.dataset.templates, c)]
    return list(task.dataset.captions)


def assign_slices(tasks: list[Task]) -> tuple[list, list[str]]:
    images, texts = [], []
    for task in tasks:
        paths, prompts = [str(p) for p in task.dataset.image_paths], task_texts(task)
        task.images = slice(len(images), len(images) + len(paths))
        task.texts = slice(len(texts), len(texts) + len(prompts))
        images, texts = images + paths, texts + prompts
    return images, texts


def encode(encoder_cls, column: str, values: list, args: argparse.Namespace) -> np.ndarray:
    """(N, D) unit features of `values`, in order, from encoder actors."""
    if not values:
        return np.zeros((0, 0), np.float32)
    rows = [{encoders.INDEX: i, column: v} for i, v in enumerate(values)]
    out = ray.data.from_items(rows).map_batches(
        encoder_cls, fn_constructor_args=(args.checkpoint, "cuda" if args.use_gpu else "cpu", args.scorer),
        batch_size=args.batch_size, batch_format="numpy", num_gpus=1 if args.use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(size=args.num_encoders))
    return encoders.stack_by_index(out.take_all())


def score_task(task: Task, image_features, text_features, similarity) -> dict:
    images, texts = image_features[task.images], text_features[task.texts]
    if task.kind == "zeroshot":
        lookup = dict(zip(task_texts(task), texts))  # prompt -> its precomputed feature
        weights = build_zeroshot_weights(lambda prompts: np.stack([lookup[p] for p in prompts]),
                                         task.dataset.classnames, task.dataset.templates)  # (C, D)
        metrics = compute_zeroshot_metrics(similarity(images, weights), task.dataset.labels)
        return {**metrics, "n_images": task.dataset.n_images, "n_classes": task.dataset.n_classes}
    metrics = compute_retrieval_recall(similarity(images, texts), task.dataset.text_to_image)
    return {**metrics, "protocol": task.dataset.protocol, "n_images": task.dataset.n_images,
            "n_texts": task.dataset.n_texts}


def run_evaluation(args: argparse.Namespace) -> dict:
    bundle = load_inference_model(args.checkpoint, scorer=args.scorer)  # info["scorer"] is reported
    report = {"checkpoint": bundle.info, "zeroshot": {}, "retrieval": {}, "skipped": {}}
    tasks = load_tasks(args, report["skipped"])
    images, texts = assign_slices(tasks)
    image_features = encode(encoders.ImageEncoder, encoders.PATH, images, args)
    text_features = encode(encoders.TextEncoder, encoders.TEXT, texts, args)
    for task in tasks:
        try:
            report[SECTION[task.kind]][task.name] = score_task(task, image_features, text_features,
                                                               bundle.similarity)
        except ValueError as err:  # e.g. non-finite scores from a diverged model
            report["skipped"][task.name] = f"ValueError: {err}"
    return report


def publish_report(report: dict, output: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_report(report, tmp)
        fs, path = storage.open_storage(output)
        for local in paths:
            storage.write_bytes_atomic(fs, storage.join(path, Path(local).name), Path(local).read_bytes())


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray_setup.init_ray(args.ray_address)
    report = run_evaluation(args)
    publish_report(report, args.output)
    print(f"report written to {args.output}")
    return report


if __name__ == "__main__":
    main()
