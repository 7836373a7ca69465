"""The evaluation job's speed: embedding throughput (images per second) of its Ray Data pass
(`evaluation.evaluate.encode`: encoder actors reading image files) against a bare loop in one
process that reads, preprocesses and calls the model's image encoder on the same batches; and
the time to score retrieval for 25k captions x 5k images (COCO 5k's size) with our recall code,
against CLIP_benchmark's `recall_at_k` on the same scores.

    python benchmarks/bench_eval.py [--arch clip-tiny-p8-64] [--n-images 2048] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from evaluation import encoders, evaluate  # noqa: E402
from evaluation.cache import EmbeddingCache  # noqa: E402
from scoring.retrieval import compute_retrieval_recall  # noqa: E402
from pipelines import ray_setup  # noqa: E402
from tests.eval_fixtures import class_image  # noqa: E402
from training import checkpoint  # noqa: E402
from training.config import apply_overrides, temperature_of  # noqa: E402
from training.methods.recipes import build_method_config  # noqa: E402
from training.model import build_model  # noqa: E402
from training.optim import build_optimizer, build_scheduler  # noqa: E402


def save_checkpoint(directory: Path, arch: str) -> str:
    config = apply_overrides(build_method_config("clip"), {"model.arch": arch})
    model = build_model(config.model, config.masking, temperature_of(config.loss, config.topology))
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, warmup_steps=1, total_steps=2)
    return str(checkpoint.save_checkpoint(directory, model, optimizer, scheduler, 1, config, {}))


def write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(class_image(i % 6, i, image_format="JPEG"))
        paths.append(str(path))
    return paths


def time_job(paths: list[str], uri: str, args) -> float:
    job_args = evaluate.parse_args(
        [
            "--checkpoint",
            uri,
            "--output",
            "-",
            "--batch-size",
            str(args.batch_size),
            "--num-encoders",
            str(args.num_encoders),
        ]
    )
    job_args.pinned_checkpoint, job_args.checkpoint_cache, no_cache = uri, None, EmbeddingCache(None, "")
    evaluate.encode("image", [paths[: args.batch_size]], no_cache, job_args)  # warm-up: actor start, model load
    start = time.perf_counter()
    features = evaluate.encode("image", evaluate.split_blocks(paths, job_args.cache_block), no_cache, job_args)
    elapsed = time.perf_counter() - start
    assert sum(map(len, features)) == len(paths)
    return len(paths) / elapsed


def time_bare_loop(paths: list[str], uri: str, args) -> float:
    encoder = encoders.ImageEncoder(uri)
    rows = encoders.image_rows(paths)
    batches = [
        {k: np.array([r[k] for r in rows[s : s + args.batch_size]], dtype=object) for k in rows[0]}
        for s in range(0, len(rows), args.batch_size)
    ]
    encoder(batches[0])  # warm-up
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            encoder.bundle.model.encode_image(encoder.pixels(batch))
    return len(paths) / (time.perf_counter() - start)


def time_retrieval(n_images: int, n_texts: int, dim: int) -> tuple[float, float]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n_images, dim)).astype(np.float32)
    texts = rng.normal(size=(n_texts, dim)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    text_to_image = np.repeat(np.arange(n_images), n_texts // n_images)
    start = time.perf_counter()
    compute_retrieval_recall(images @ texts.T, text_to_image)
    ours = time.perf_counter() - start
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    start = time.perf_counter()
    scores = torch.from_numpy(texts) @ torch.from_numpy(images).T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(n_texts), torch.from_numpy(text_to_image)] = True
    for k in (1, 5, 10):
        (batchify(recall_at_k, scores, positive, 64, "cpu", k=k) > 0).float().mean()
        (batchify(recall_at_k, scores.T, positive.T, 64, "cpu", k=k) > 0).float().mean()
    return ours, time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="clip-tiny-p8-64")
    p.add_argument("--n-images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-encoders", type=int, default=1)
    p.add_argument("--dim", type=int, default=512, help="feature width for the retrieval timing (ViT-B: 512)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        uri = save_checkpoint(Path(tmp) / "ckpt", args.arch)
        paths = write_images(Path(tmp) / "images", args.n_images)
        ray_setup.init_ray(num_cpus=args.num_encoders + 1)
        job = time_job(paths, uri, args)
        bare = time_bare_loop(paths, uri, args)
    ours, theirs = time_retrieval(5000, 25000, args.dim)
    print(
        f"embedding ({args.arch}, {args.n_images} JPEG files, batch {args.batch_size}, "
        f"{args.num_encoders} encoder actor(s), {torch.get_num_threads()} torch threads in the bare loop):"
    )
    print(f"  evaluation job (Ray Data) {job:8.1f} images/s")
    print(f"  bare loop (one process)   {bare:8.1f} images/s   job / bare = {job / bare:.2f}")
    print(f"retrieval scoring, 25000 captions x 5000 images, dim {args.dim}, R@1/5/10 both ways:")
    print(f"  ours (NumPy ranks)        {ours:8.2f} s")
    print(f"  CLIP_benchmark recall_at_k {theirs:7.2f} s   ratio = {theirs / ours:.2f}x")
    return {"job_images_per_s": job, "bare_images_per_s": bare, "retrieval_s": ours, "clip_benchmark_s": theirs}


if __name__ == "__main__":
    main()
