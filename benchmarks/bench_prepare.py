"""prepare_cc12m.py throughput per core against a plain loop that only decodes, resizes and
re-encodes the same images (what any pipeline must at least do).

    python benchmarks/bench_prepare.py [--n-images 2000] [--image-size 64]

The job also downloads over HTTP (loopback mirror), groups captions, computes Sobel edge
maps, writes tars, Parquet and the manifest, and pays Ray's start-up and scheduling.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from pipelines import build, ray_setup
from pipelines.demo_corpus import write_cc12m_tsv, write_demo_corpus
from pipelines.mirror import LoopbackMirror
from pipelines.prepare_cc12m import build_params, parse_args


def time_plain_loop(paths: list[Path], size: int) -> float:
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for path in paths:
        img = cv2.imdecode(np.frombuffer(path.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return len(paths) / (time.perf_counter() - start)


def time_job(tsv: Path, out: Path, size: int, n_images: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    args = parse_args(["--input", str(tsv), "--output", str(out), "--image-size", str(size),
                       "--shard-size", "250"])
    start = time.perf_counter()
    build.run_build(args.input, args.output, build_params(args), read_lines=build.read_text_lines)
    return n_images / (time.perf_counter() - start)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=64)
    args = p.parse_args(argv)
    workdir, cores = Path(args.workdir).resolve(), os.cpu_count() or 1
    corpus = write_demo_corpus(workdir / f"prep-corpus-{args.n_images}", n_images=args.n_images, seed=1)
    ray_setup.init_ray(num_cpus=cores)
    plain = time_plain_loop(sorted(corpus.images_dir.glob("*.jpg")), args.image_size)
    with LoopbackMirror(corpus.mirror_root) as mirror:
        tsv = write_cc12m_tsv(corpus, mirror.base_url, workdir / "prep.tsv")
        job = time_job(tsv, workdir / "prep-shards", args.image_size, args.n_images)
    print(f"plain decode+resize+encode loop: {plain:8.1f} images/s on 1 core")
    print(f"prepare_cc12m.py (Ray Data, {cores} cores): {job:8.1f} images/s = {job / cores:.1f} images/s/core "
          f"(incl. Ray start-up of the job's stages, HTTP, grouping, edges, tar+parquet)")
    print(f"ratio job per core / plain loop: {job / cores / plain:.2f}")
    return {"plain": plain, "job_per_core": job / cores}


if __name__ == "__main__":
    main()
