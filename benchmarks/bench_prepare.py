"""prepare_cc12m.py throughput per core against a plain loop that only decodes, resizes and
re-encodes the same images (what any pipeline must at least do).

    python benchmarks/bench_prepare.py [--n-images 1200] [--source-size 512] [--image-size 256]

Three figures, all in images per second per core:
  plain   decode + resize + JPEG encode with OpenCV, one core;
  stages  our per-image CPU work on one core without Ray or HTTP: img2dataset's resizer,
          Sobel edge map (PNG), the sample record and its share of the tar;
  job     the whole Ray Data job on all cores, downloading over HTTP from a loopback mirror
          that runs on the same cores, grouping captions, writing tars, Parquet and the
          manifest; reported in total and as the marginal rate between two corpus sizes
          (which removes the job's fixed start-up cost).
"""
from __future__ import annotations

import argparse
import io
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


def time_stages(paths: list[Path], size: int) -> float:
    """Our per-image CPU work, one core, on bytes already in memory."""
    from pipelines.shards import encode_shard_tar
    from pipelines.stages import DownloadParams, ImageFetcher, build_sample
    resize = ImageFetcher(DownloadParams(image_size=size)).resizer
    blobs = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    samples = []
    for i, blob in enumerate(blobs):
        jpg, width, height, orig_w, orig_h, _ = resize(io.BytesIO(blob))
        group = {"key": f"{i:024x}", "url": f"http://x/{i}.jpg", "captions": [{"text": "a red circle",
                 "source": "bench", "kind": "short"}]}
        samples.append(build_sample(group, {"jpg": jpg, "width": width, "height": height,
                                            "original_width": orig_w, "original_height": orig_h}))
    encode_shard_tar(samples)
    return len(blobs) / (time.perf_counter() - start)


def time_job(tsv: Path, out: Path, size: int, n_images: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    args = parse_args(["--input", str(tsv), "--output", str(out), "--image-size", str(size),
                       "--shard-size", "250"])
    start = time.perf_counter()
    build.run_build(args.input, args.output, build_params(args), read_lines=build.read_text_lines)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--n-images", type=int, default=1200)
    p.add_argument("--source-size", type=int, default=512, help="side of the served images")
    p.add_argument("--image-size", type=int, default=256, help="side of the stored images")
    args = p.parse_args(argv)
    workdir, cores = Path(args.workdir).resolve(), os.cpu_count() or 1
    ray_setup.init_ray(num_cpus=cores)
    seconds = {}
    for n in (args.n_images // 4, args.n_images // 4, args.n_images):  # the first run warms Ray up
        corpus = write_demo_corpus(workdir / f"prep-corpus-{n}", n_images=n, seed=1,
                                   image_size=args.source_size)
        with LoopbackMirror(corpus.mirror_root) as mirror:
            tsv = write_cc12m_tsv(corpus, mirror.base_url, workdir / f"prep-{n}.tsv")
            seconds[n] = time_job(tsv, workdir / f"prep-shards-{n}", args.image_size, n)
    paths = sorted(corpus.images_dir.glob("*.jpg"))
    plain, stages = time_plain_loop(paths, args.image_size), time_stages(paths, args.image_size)
    small, large = sorted(seconds)
    total = large / seconds[large] / cores
    marginal = (large - small) / (seconds[large] - seconds[small]) / cores
    print(f"{args.source_size} px JPEGs -> {args.image_size} px, {cores} cores")
    print(f"plain decode+resize+encode loop : {plain:8.1f} images/s/core")
    print(f"our stages, no Ray, no HTTP     : {stages:8.1f} images/s/core  (ratio to plain {stages / plain:.2f})")
    print(f"prepare_cc12m.py, {large} images : {total:8.1f} images/s/core  (ratio to plain {total / plain:.3f}; "
          f"{seconds[large]:.1f} s on {cores} cores incl. start-up)")
    print(f"prepare_cc12m.py, marginal      : {marginal:8.1f} images/s/core  (ratio to plain {marginal / plain:.3f}; "
          f"{small} -> {large} images)")
    return {"plain": plain, "stages": stages, "job_total": total, "job_marginal": marginal}


if __name__ == "__main__":
    main()
