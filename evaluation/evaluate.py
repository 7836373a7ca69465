"""Evaluate a checkpoint: zero-shot classification and image<->text retrieval, as its own
Ray job (image and text encoding spread over Ray Data actors).

    python evaluation/evaluate.py --checkpoint runs/<run> --zeroshot demo/eval/zeroshot \
        --retrieval demo/eval/retrieval/dataset_karpathy.json --output reports/<run>
    ray job submit --working-dir . -- python evaluation/evaluate.py --checkpoint s3://... ...

Writes report.json and report.md to --output (local folder or s3://).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
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
from evaluation.tasks.zeroshot import build_zeroshot_weights, compute_zeroshot_metrics  # noqa: E402
from pipelines import ray_setup, storage  # noqa: E402
from training.inference import load_inference_model  # noqa: E402

log = logging.getLogger("evaluation")


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
    p.add_argument("--ray-address", default=None)
    return p.parse_args(argv)


class EmbeddingJob:
    """Encodes lists of images or texts with encoder actors of one checkpoint."""

    def __init__(self, checkpoint_uri: str, batch_size: int, num_encoders: int, use_gpu: bool):
        self.checkpoint_uri, self.batch_size = checkpoint_uri, batch_size
        self.num_encoders, self.use_gpu = num_encoders, use_gpu

    def _run(self, encoder_cls, column: str, values: list) -> np.ndarray:
        rows = [{encoders.INDEX: i, column: str(v)} for i, v in enumerate(values)]
        out = ray.data.from_items(rows).map_batches(
            encoder_cls, fn_constructor_args=(self.checkpoint_uri, "cuda" if self.use_gpu else "cpu"),
            batch_size=self.batch_size, batch_format="numpy", num_gpus=1 if self.use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=self.num_encoders))
        return encoders.stack_by_index(out.take_all())

    def images(self, paths: list) -> np.ndarray:
        return self._run(encoders.ImageEncoder, encoders.PATH, paths)

    def texts(self, texts: list[str]) -> np.ndarray:
        return self._run(encoders.TextEncoder, encoders.TEXT, texts)


def evaluate_zeroshot(job: EmbeddingJob, root: str, similarity) -> tuple[str, dict]:
    dataset = load_image_folder(root)
    weights = build_zeroshot_weights(job.texts, dataset.classnames, dataset.templates)  # (C, D)
    logits = similarity(job.images(dataset.image_paths), weights)  # (N, C)
    metrics = compute_zeroshot_metrics(logits, dataset.labels)
    return dataset.name, {**metrics, "n_images": dataset.n_images, "n_classes": dataset.n_classes}


def evaluate_retrieval(job: EmbeddingJob, dataset, similarity) -> tuple[str, dict]:
    scores = similarity(job.images(dataset.image_paths), job.texts(dataset.captions))  # (N, M)
    metrics = compute_retrieval_recall(scores, dataset.text_to_image)
    return dataset.name, {**metrics, "protocol": dataset.protocol, "n_images": dataset.n_images,
                          "n_texts": dataset.n_texts}


def run_evaluation(args: argparse.Namespace) -> dict:
    bundle = load_inference_model(args.checkpoint)
    job = EmbeddingJob(args.checkpoint, args.batch_size, args.num_encoders, args.use_gpu)
    report = {"checkpoint": bundle.info, "zeroshot": {}, "retrieval": {}, "skipped": {}}
    tasks = ([("zeroshot", r, lambda r=r: evaluate_zeroshot(job, r, bundle.similarity)) for r in args.zeroshot]
             + [("retrieval", r, lambda r=r: evaluate_retrieval(job, load_karpathy(r), bundle.similarity))
                for r in args.retrieval]
             + [("retrieval", r, lambda r=r: evaluate_retrieval(job, load_long_caption_folder(r),
                                                                bundle.similarity))
                for r in args.long_retrieval])
    for section, source, task in tasks:
        try:
            name, metrics = task()
            report[section][name] = metrics
            log.info("%s %s: %s", section, name, metrics)
        except (FileNotFoundError, ValueError) as err:  # a missing dataset skips, never fails the suite
            report["skipped"][str(source)] = f"{type(err).__name__}: {err}"
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
