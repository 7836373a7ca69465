"""The command-line arguments every prepare job shares, and the BuildParams they make."""

from __future__ import annotations

import argparse

from pipelines import console, ray_setup
from pipelines.build import BuildAborted, BuildParams
from pipelines.captions import CaptionRules
from pipelines.stages import DownloadParams


def add_build_args(p: argparse.ArgumentParser, corpus: str) -> None:
    p.add_argument("--output", required=True, help="shard root, local folder or s3:// prefix")
    p.add_argument("--corpus", default=corpus, help="name of the build folder under --output")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="center_crop", choices=["center_crop", "keep_ratio", "border", "no"])
    p.add_argument(
        "--min-image-size", type=int, default=32, help="reject images whose shorter side is below this (source pixels)"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=DownloadParams.max_image_area,
        help="reject larger images before decoding them (decompression bombs)",
    )
    p.add_argument("--max-caption-chars", type=int, default=CaptionRules.max_caption_chars)
    p.add_argument("--long-caption-min-words", type=int, default=20)
    p.add_argument(
        "--max-failure-rate", type=float, default=0.9, help="abort when a larger fraction of rows or images fails"
    )
    p.add_argument(
        "--allow-loopback-urls",
        action="store_true",
        help="fetch URLs on 127.0.0.0/8 (demo mirror, tests); private, link-local "
        "and metadata addresses are refused regardless",
    )
    p.add_argument("--threads-per-task", type=int, default=16, help="download threads per shard task")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per download")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a local instance")
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs too")


def build_params(args: argparse.Namespace, reader: dict | None = None) -> BuildParams:
    download = DownloadParams(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        min_image_size=args.min_image_size,
        max_image_area=args.max_image_pixels,
        allow_loopback=args.allow_loopback_urls,
        timeout_s=args.timeout,
        retries=args.retries,
        thread_count=args.threads_per_task,
    )
    rules = CaptionRules(max_caption_chars=args.max_caption_chars, long_caption_min_words=args.long_caption_min_words)
    return BuildParams(
        corpus=args.corpus,
        shard_size=args.shard_size,
        download=download,
        caption_rules=rules,
        reader=reader or {},
        max_failure_rate=args.max_failure_rate,
    )


def configure_logging(verbose: bool = False) -> None:
    ray_setup.configure_logging(verbose)


# What a prepare job's workers load while its driver plans: the planning stages, and the
# download stage's fetcher (the resizer loads at a task's first image, stages.ImageFetcher).
WARM_MODULES = ("pipelines.build", "pipelines.img2dataset_modules:load_downloader")


def run_job(run, args: argparse.Namespace):
    """A prepare job's entry: logging, Ray (local or --ray-address), then `run(args)`; an
    aborted build exits with its reason instead of a traceback."""
    configure_logging(getattr(args, "verbose", False))
    try:
        with ray_setup.ray_for_job(args.ray_address, warm_modules=WARM_MODULES), console.stage("prepare", args.corpus):
            return run(args)
    except BuildAborted as error:
        raise SystemExit(f"build aborted: {error}") from error


def report(build_uri: str, manifest: dict) -> None:
    print(f"build: {build_uri}")
    print(f"counts: {manifest['counts']}")
