"""A demo-corpus build that benchmarks share (prepared once under --workdir, then reused)."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines import prepare_cc12m
from pipelines.demo_corpus import write_cc12m_tsv, write_demo_corpus
from pipelines.mirror import LoopbackMirror

MIRROR_PORT = 18766


def ensure_demo_build(workdir: Path, n_images: int, image_size: int = 64) -> str:
    """Build uri of a prepared demo corpus (reused when the same build exists)."""
    marker = workdir / f"build-{n_images}-{image_size}.json"
    if marker.exists():
        return json.loads(marker.read_text())["build_uri"]
    corpus = write_demo_corpus(workdir / f"corpus-{n_images}", n_images=n_images, seed=0)
    with LoopbackMirror(corpus.mirror_root, port=MIRROR_PORT) as mirror:
        tsv = write_cc12m_tsv(corpus, mirror.base_url, workdir / f"cc12m-{n_images}.tsv")
        build_uri = prepare_cc12m.main(
            [
                "--input",
                str(tsv),
                "--output",
                str(workdir / "shards"),
                "--allow-loopback-urls",
                "--image-size",
                str(image_size),
                "--shard-size",
                "250",
            ]
        )
    marker.write_text(json.dumps({"build_uri": build_uri}))
    return build_uri


def mean_samples_per_s(metrics_path: Path, skip_windows: int = 1) -> float:
    """Mean samples/s over logged windows, skipping the first (start-up) ones."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    rows = rows[skip_windows:] or rows
    return sum(r["samples_per_s"] for r in rows) / len(rows)


def add_job_args(parser) -> None:
    """The arguments every benchmark of the training job shares."""
    parser.add_argument("--workdir", default="bench_out")
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--arch", default="clip-tiny-p8-64")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
