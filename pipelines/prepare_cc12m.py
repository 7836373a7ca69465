"""Prepare CC12M (or any TSV of `url<TAB>caption`, one row per caption) into shards.

    python pipelines/prepare_cc12m.py --input cc12m.tsv --output ./shards
    ray job submit --working-dir . -- python pipelines/prepare_cc12m.py \
        --input s3://bucket/cc12m.tsv --output s3://bucket/shards
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import build, ray_setup  # noqa: E402
from pipelines.captions import CaptionRules  # noqa: E402
from pipelines.stages import DownloadParams  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="TSV file(s), local or s3://")
    p.add_argument("--output", required=True, help="shard root, local folder or s3:// prefix")
    p.add_argument("--corpus", default="cc12m")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--resize-mode", default="center_crop",
                   choices=["center_crop", "keep_ratio", "border", "no"])
    p.add_argument("--threads-per-task", type=int, default=16, help="download threads per shard task")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per download")
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--long-caption-min-words", type=int, default=20)
    p.add_argument("--ray-address", default=None, help="default: RAY_ADDRESS or a local instance")
    return p.parse_args(argv)


def build_params(args: argparse.Namespace) -> build.BuildParams:
    download = DownloadParams(image_size=args.image_size, resize_mode=args.resize_mode,
                              timeout_s=args.timeout, retries=args.retries,
                              thread_count=args.threads_per_task)
    rules = CaptionRules(long_caption_min_words=args.long_caption_min_words)
    return build.BuildParams(corpus=args.corpus, shard_size=args.shard_size,
                             download=download, caption_rules=rules)


def main(argv=None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ray_setup.init_ray(args.ray_address)
    build_uri, manifest = build.run_build(args.input, args.output, build_params(args),
                                          read_lines=build.read_text_lines)
    print(f"build: {build_uri}")
    print(f"counts: {manifest['counts']}")
    return build_uri


if __name__ == "__main__":
    main()
