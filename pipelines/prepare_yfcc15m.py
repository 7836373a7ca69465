"""Prepare YFCC15M (OpenAI's 15M-photo subset of YFCC100M) into shards.

Either the YFCC100M metadata file(s) in their published tab-separated layout (23 columns,
or 25 with line number and photo hash) joined here with OpenAI's subset list
(`yfcc100m_subset_data.tsv`: line number, photo id, photo hash), or an already-joined CSV or
Parquet table with id, url, title and description columns (and optionally a photo/video
marker). Captions are the cleaned title and description (pipelines/yfcc.py); videos,
camera-default titles, empty, non-UTF-8 and oversized captions are counted and skipped.

    python pipelines/prepare_yfcc15m.py --metadata yfcc100m_dataset --subset \
        yfcc100m_subset_data.tsv --output s3://bucket/shards
    python pipelines/prepare_yfcc15m.py --joined yfcc15m.parquet --output ./shards
    ray job submit --working-dir . -- python pipelines/prepare_yfcc15m.py ...
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.data.expressions import col  # noqa: E402

from pipelines import build, cli, yfcc  # noqa: E402
from pipelines.captions import READ_ENCODING, CaptionRules  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--metadata", nargs="+", help="YFCC100M metadata TSV file(s), local or s3://")
    p.add_argument("--subset", help="OpenAI's YFCC15M id list (with --metadata)")
    p.add_argument("--joined", nargs="+", help="joined CSV or Parquet file(s) instead")
    cli.add_build_args(p, corpus="yfcc15m")
    args = p.parse_args(argv)
    if bool(args.joined) == bool(args.metadata) or bool(args.metadata) != bool(args.subset):
        p.error("give either --metadata with --subset, or --joined")
    return args


def decode_line(line: str) -> str:
    """A line read as Latin-1, as UTF-8 with bad bytes replaced (their captions are then
    rejected as non_utf8_caption; the photo's id, URL and other caption survive)."""
    return line.encode(READ_ENCODING).decode("utf-8", errors="replace")


def parse_metadata(batch: dict) -> dict:
    records = [yfcc.parse_metadata_line(decode_line(line)) for line in batch["text"]]
    return {"photo_id": np.array([r["photo_id"] for r in records], dtype=np.int64),
            "record": np.array([json.dumps(r) for r in records], dtype=object)}


def parse_subset(batch: dict) -> dict:
    ids = [i for i in (yfcc.parse_subset_line(decode_line(line)) for line in batch["text"])
           if i is not None]
    return {"photo_id": np.array(ids, dtype=np.int64),
            "record": np.array([""] * len(ids), dtype=object),
            "in_subset": np.ones(len(ids), dtype=bool)}


def keep_subset(group: dict) -> dict:
    """Ray Data group stage (the rows of one photo id, from either file): the photo's record
    if the subset lists it ("" when the metadata lacks it), nothing otherwise."""
    if not group["in_subset"].any():
        return {"photo_id": np.array([], dtype=np.int64), "record": np.array([], dtype=object)}
    records = [r for r, listed in zip(group["record"], group["in_subset"]) if not listed]
    return {"photo_id": group["photo_id"][:1], "record": np.array(records[:1] or [""], dtype=object)}


class RecordRows:
    """Normalized records (JSON; None where the subset id has no metadata) -> caption rows."""

    def __init__(self, rules: CaptionRules):
        self.rules = rules

    def __call__(self, batch: dict) -> dict:
        rows = []
        for record in batch["record"]:
            if not record:
                rows.append({"reason": "missing_metadata"})
            else:
                rows.extend(yfcc.yfcc_caption_rows(json.loads(record), self.rules))
        return build.rows_to_columns(rows)


class JoinedRows:
    """Rows of an already-joined table (pandas batches) -> caption rows."""

    def __init__(self, rules: CaptionRules):
        self.rules = rules

    def __call__(self, frame) -> dict:
        records = [yfcc.joined_record(r) for r in frame.to_dict("records")]
        return build.rows_to_columns([row for r in records
                                      for row in yfcc.yfcc_caption_rows(r, self.rules)])


def read_joined_rows(uris: list[str], rules: CaptionRules):
    fs, _ = build.arrow_filesystem(uris[0])
    paths = [build.arrow_filesystem(u)[1] for u in uris]
    reader = ray.data.read_parquet if uris[0].endswith(".parquet") else ray.data.read_csv
    return reader(paths, filesystem=fs).map_batches(JoinedRows, fn_constructor_args=(rules,),
                                                    batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=1))


def read_metadata_rows(metadata: list[str], subset: str, rules: CaptionRules):
    """Subset ids left-joined with the metadata records: both files' rows grouped by photo id
    (a Ray Data hash shuffle; Dataset.join would need polars)."""
    records = build.read_text_lines(metadata).map_batches(parse_metadata, batch_format="numpy")
    records = records.map_batches(lambda b: {**b, "in_subset": np.zeros(len(b["photo_id"]), bool)},
                                  batch_format="numpy").materialize()
    malformed = records.filter(expr=col("photo_id") == yfcc.NO_PHOTO_ID).drop_columns(["in_subset"])
    ids = build.read_text_lines([subset]).map_batches(parse_subset, batch_format="numpy")
    n_partitions = max(1, min(build.MAX_SHUFFLE_PARTITIONS, records.count() // build.ROWS_PER_BUCKET))
    joined = ids.union(records.filter(expr=col("photo_id") != yfcc.NO_PHOTO_ID)).groupby(
        "photo_id", num_partitions=n_partitions).map_groups(keep_subset, batch_format="numpy")
    return joined.union(malformed).map_batches(RecordRows, fn_constructor_args=(rules,),
                                               batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))


def run(args: argparse.Namespace) -> tuple[str, dict]:
    mode = "joined" if args.joined else "metadata"
    params = cli.build_params(args, reader={"input": mode})
    if args.joined:
        inputs = args.joined
        read_rows = functools.partial(read_joined_rows, rules=params.caption_rules)
    else:
        inputs = [*args.metadata, args.subset]
        read_rows = lambda _: read_metadata_rows(args.metadata, args.subset, params.caption_rules)  # noqa: E731
    return build.run_build(inputs, args.output, params, read_rows=read_rows)


def main(argv=None) -> str:
    args = parse_args(argv)
    build_uri, manifest = cli.run_job(run, args)
    cli.report(build_uri, manifest)
    return build_uri


if __name__ == "__main__":
    main()
