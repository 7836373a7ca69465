"""Prepare-stage throughput per core against the bare decode-resize-encode loop, the edge
map's share of time and bytes, and (with --job) the whole Ray Data job.

    python benchmarks/bench_prepare.py [--n-images 400] [--image-size 256] [--job]

Per image, on one core, on the same photographs held in memory (skimage's sample photos
and demo scenes, cropped and scaled to 640x480-class sources, JPEG q90):
  bare    decode + resize + JPEG encode with OpenCV: what any pipeline must at least do;
  stages  what prepare does after the download: header checks (Pillow), img2dataset's
          resizer, the Sobel edge map (4x4-cell means, PNG), the sample record, the tar
          and its Parquet index, written to disk;
  edges   the edge map alone (decode the stored JPEG, Sobel, pool, quantise, PNG).
Requirements: edges <= 1/4 of bare's time per image, edge bytes <= 1/5 of the image's.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

from pipelines import edges, shards, storage
from pipelines.demo_corpus import write_demo_corpus
from pipelines.image_input import prepare_source_image
from pipelines.stages import DownloadParams, ImageFetcher, build_sample

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "motorcycle_left",
)


def source_images(n: int, seed: int = 0) -> list[bytes]:
    """n JPEG sources: random 4:3 crops of real photos, scaled to 480-720 px wide."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skdata, name)() for name in PHOTOS if hasattr(skdata, name)]
    photos = [p if p.ndim == 3 else np.dstack([p] * 3) for p in photos]
    blobs = []
    for i in range(n):
        photo = photos[i % len(photos)][..., :3]
        h, w = photo.shape[:2]
        ch = int(h * rng.uniform(0.6, 1.0))
        cw = min(w, int(ch * 4 / 3))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        width = int(rng.uniform(480, 720))
        crop = cv2.resize(
            np.ascontiguousarray(photo[top : top + ch, left : left + cw, ::-1]),
            (width, width * 3 // 4),
            interpolation=cv2.INTER_AREA,
        )
        blobs.append(cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return blobs


def time_bare_loop(blobs: list[bytes], size: int) -> tuple[float, list[bytes]]:
    cv2.setNumThreads(1)
    out, start = [], time.perf_counter()
    for blob in blobs:
        img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        scale = size / min(img.shape[:2])
        img = cv2.resize(
            img,
            (max(size, round(img.shape[1] * scale)), max(size, round(img.shape[0] * scale))),
            interpolation=cv2.INTER_AREA,
        )
        top, left = (img.shape[0] - size) // 2, (img.shape[1] - size) // 2
        out.append(
            cv2.imencode(".jpg", img[top : top + size, left : left + size], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
        )
    return (time.perf_counter() - start) / len(blobs), out


def time_stages(blobs: list[bytes], size: int, folder: str, shard_size: int = 100) -> float:
    """Seconds per image of our stages after the download, shards written to `folder`."""
    params = DownloadParams(image_size=size)
    resize = ImageFetcher(params).resizer
    fs, path = storage.open_storage(folder)
    start, samples, shard_id = time.perf_counter(), [], 0
    for i, blob in enumerate(blobs):
        raw, reason = prepare_source_image(blob, params.max_image_area, params.min_image_size)
        jpg, width, height, orig_w, orig_h, _ = resize(io.BytesIO(raw))
        group = {
            "key": f"{i:024x}",
            "source": f"http://x/{i}.jpg",
            "captions": [{"text": "a photograph", "source": "bench", "kind": "short"}],
        }
        samples.append(
            build_sample(
                group,
                {"jpg": jpg, "width": width, "height": height, "original_width": orig_w, "original_height": orig_h},
            )
        )
        if len(samples) == shard_size or i == len(blobs) - 1:
            shards.write_shard(fs, path, shard_id, samples, {"failures": {}})
            samples, shard_id = [], shard_id + 1
    return (time.perf_counter() - start) / len(blobs)


def time_edges(stored: list[bytes]) -> tuple[float, list[bytes]]:
    start = time.perf_counter()
    pngs = [edges.compute_edge_png(jpg) for jpg in stored]
    return (time.perf_counter() - start) / len(stored), pngs


def demo_sources(n: int, workdir: Path) -> list[bytes]:
    corpus = write_demo_corpus(
        workdir / "bench-prepare-demo", n_images=n, seed=2, image_size=512, n_eval_per_class=1, n_eval_retrieval=1
    )
    return [p.read_bytes() for p in sorted(corpus.images_dir.glob("*.jpg"))[:n]]


def report(name: str, blobs: list[bytes], size: int) -> dict:
    bare_s, stored = time_bare_loop(blobs, size)
    with tempfile.TemporaryDirectory() as folder:
        stages_s = time_stages(blobs, size, folder)
    edge_s, pngs = time_edges(stored)
    edge_bytes = sum(len(p) for p in pngs) / sum(len(j) for j in stored)
    print(f"--- {name}: {len(blobs)} sources, mean {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB -> {size} px")
    print(f"bare decode+resize+encode : {1 / bare_s:8.1f} images/s/core ({bare_s * 1e3:.2f} ms/image)")
    print(
        f"prepare stages + write    : {1 / stages_s:8.1f} images/s/core ({stages_s * 1e3:.2f} ms/image)"
        f"  ratio stages/bare rate {bare_s / stages_s:.2f}"
    )
    print(
        f"edge map alone            : {edge_s * 1e3:.2f} ms/image = {edge_s / bare_s:.2f} of bare time "
        f"(limit 0.25: {'ok' if edge_s / bare_s <= 0.25 else 'OVER'})"
    )
    print(
        f"edge map bytes            : {edge_bytes:.3f} of the stored JPEG's "
        f"(limit 0.20: {'ok' if edge_bytes <= 0.2 else 'OVER'})"
    )
    return {"bare_s": bare_s, "stages_s": stages_s, "edge_time_ratio": edge_s / bare_s, "edge_bytes_ratio": edge_bytes}


def time_job(n_images: int, size: int, workdir: Path) -> None:
    """The whole Ray Data job (download from a loopback mirror included), marginal rate."""
    from pipelines import prepare_cc12m, ray_setup
    from pipelines.demo_corpus import write_cc12m_tsv
    from pipelines.mirror import LoopbackMirror

    cores = os.cpu_count() or 1
    ray_setup.init_ray(num_cpus=cores)
    seconds = {}
    for n in (n_images // 4, n_images // 4, n_images):  # the first run warms Ray up
        corpus = write_demo_corpus(workdir / f"prep-corpus-{n}", n_images=n, seed=1, image_size=512)
        out = workdir / f"prep-shards-{n}"
        shutil.rmtree(out, ignore_errors=True)
        with LoopbackMirror(corpus.mirror_root) as mirror:
            tsv = write_cc12m_tsv(corpus, mirror.base_url, workdir / f"prep-{n}.tsv")
            start = time.perf_counter()
            prepare_cc12m.run(
                prepare_cc12m.parse_args(
                    [
                        "--input",
                        str(tsv),
                        "--output",
                        str(out),
                        "--image-size",
                        str(size),
                        "--shard-size",
                        "250",
                        "--allow-loopback-urls",
                    ]
                )
            )
            seconds[n] = time.perf_counter() - start
    small, large = sorted(seconds)
    marginal = (large - small) / (seconds[large] - seconds[small]) / cores
    print(f"--- prepare_cc12m.py job on {cores} cores (mirror on the same cores)")
    print(f"{large} images in {seconds[large]:.1f} s incl. start-up; marginal {marginal:.1f} images/s/core")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--image-size", type=int, default=256, help="side of the stored images")
    p.add_argument("--job", action="store_true", help="also time the whole Ray Data job")
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    report("photographs (skimage samples)", source_images(args.n_images), args.image_size)
    report("demo scenes (512 px, flat colours)", demo_sources(args.n_images, workdir), args.image_size)
    if args.job:
        time_job(args.n_images * 3, args.image_size, workdir)


if __name__ == "__main__":
    main()
