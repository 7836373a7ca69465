"""Prepare ShareGPT4V's long captions into two builds: the first --validation-records records
(the "ShareGPT4V-1k" long-caption retrieval set, corpus `<corpus>-val<N>`, named
`sharegpt4v-1k` for the usual 1,000) and the training build of all the others.

Images are files under --image-root (a local folder or an `s3://` prefix), named by each
record's relative `image` path. With COCO's captions_train2017.json, the five COCO captions
of each COCO image join its caption group beside the long caption; the first sentence of
every long caption is kept as a short caption (SmartCLIP samples from long and short).

    python pipelines/prepare_sharegpt4v.py \
        --captions share-captioner_coco_lcs_sam_1246k_1107.json --image-root s3://bucket/data \
        --coco-captions annotations/captions_train2017.json --output s3://bucket/shards

The caption JSON (a single JSON array, about 1.2M records) is parsed on the driver.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from pipelines import build, cli, sharegpt4v, storage  # noqa: E402
from pipelines.captions import CaptionRules  # noqa: E402

RECORDS_PER_BLOCK = 20_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True, help="ShareGPT4V caption JSON, local or s3://")
    p.add_argument("--image-root", required=True, help="folder or s3:// prefix of the images")
    p.add_argument("--coco-captions", default=None, help="COCO captions_train2017.json")
    p.add_argument("--validation-records", type=int, default=sharegpt4v.VALIDATION_RECORDS)
    cli.add_build_args(p, corpus="sharegpt4v")
    return p.parse_args(argv)


def load_json(uri: str):
    fs, path = storage.open_storage(uri)
    return json.loads(storage.read_bytes(fs, path))


class RecordRows:
    """ShareGPT4V records (JSON text) -> caption rows."""

    def __init__(self, image_root: str, coco: dict | None, rules: CaptionRules):
        self.image_root, self.coco, self.rules = image_root, coco, rules

    def __call__(self, batch: dict) -> dict:
        rows = [row for record in batch["record"]
                for row in sharegpt4v.sharegpt4v_caption_rows(json.loads(record), self.image_root,
                                                              self.coco, self.rules)]
        return build.rows_to_columns(rows)


def validation_corpus(corpus: str, n_val: int) -> str:
    return f"{corpus}-1k" if n_val == 1000 else f"{corpus}-val{n_val}"


def build_split(args, records: list, indices: range, coco: dict | None, split: str,
                corpus: str) -> tuple[str, dict]:
    reader = {"split": split, "validation_records": args.validation_records,
              "image_root": args.image_root.rstrip("/"), "coco": coco is not None}
    args = argparse.Namespace(**{**vars(args), "corpus": corpus})
    params = cli.build_params(args, reader=reader)
    items = [{"record": json.dumps(records[i])} for i in indices]

    def read_rows(_):
        blocks = max(1, len(items) // RECORDS_PER_BLOCK)
        return ray.data.from_items(items, override_num_blocks=blocks).map_batches(
            RecordRows, fn_constructor_args=(args.image_root, coco, params.caption_rules),
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1))

    inputs = [args.captions] + ([args.coco_captions] if args.coco_captions else [])
    return build.run_build(inputs, args.output, params, read_rows=read_rows)


def run(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    records = load_json(args.captions)
    if not isinstance(records, list):
        raise SystemExit(f"{args.captions} is not a JSON list of ShareGPT4V records")
    coco = sharegpt4v.coco_captions_by_file(load_json(args.coco_captions)) if args.coco_captions else None
    val, train = sharegpt4v.split_validation(len(records), args.validation_records)
    return {"validation": build_split(args, records, val, coco, "validation",
                                      validation_corpus(args.corpus, args.validation_records)),
            "train": build_split(args, records, train, coco, "train", args.corpus)}


def main(argv=None) -> dict[str, str]:
    args = parse_args(argv)
    builds = cli.run_job(run, args)
    for split, (build_uri, manifest) in builds.items():
        print(f"[{split}]")
        cli.report(build_uri, manifest)
    return {split: uri for split, (uri, _) in builds.items()}


if __name__ == "__main__":
    main()
