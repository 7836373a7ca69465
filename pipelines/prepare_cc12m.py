"""Prepare CC12M (or any TSV of `url<TAB>caption`, one row per caption) into shards.

    python pipelines/prepare_cc12m.py --input cc12m.tsv --output ./shards
    ray job submit --working-dir . -- python pipelines/prepare_cc12m.py \
        --input s3://bucket/cc12m.tsv --output s3://bucket/shards
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines import build, cc12m, cli  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="TSV file(s), local or s3://")
    cli.add_build_args(p, corpus="cc12m")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> tuple[str, dict]:
    params = cli.build_params(args)
    read_rows = functools.partial(cc12m.read_tsv_rows, rules=params.caption_rules, origin=args.corpus)
    return build.run_build(args.input, args.output, params, read_rows=read_rows)


def main(argv=None) -> str:
    args = parse_args(argv)
    build_uri, manifest = cli.run_job(run, args)
    cli.report(build_uri, manifest)
    return build_uri


if __name__ == "__main__":
    main()
