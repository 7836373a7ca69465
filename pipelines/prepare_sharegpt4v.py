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

The caption JSON (a single JSON array, about 1.2M records, gigabytes) is never held whole:
one Ray task streams it (pipelines/json_stream.py) and hands each record's JSON text on in
blocks to a pool of actors that turn records into caption rows on every CPU Ray has.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from pipelines import build, captions, cli, sharegpt4v, storage  # noqa: E402
from pipelines.captions import CaptionRules  # noqa: E402
from pipelines.json_stream import iter_json_array  # noqa: E402

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


def stream_records(batch: dict, first: int, stop: int | None, block: int = RECORDS_PER_BLOCK):
    """Ray Data stage (a generator): the caption JSON named in `batch` -> the JSON text of its
    records first..stop-1 (file order, malformed ones included), `block` records per batch.
    Undecodable bytes become U+FFFD, so their captions are counted as non_utf8_caption."""
    for uri in batch["uri"]:
        fs, path = storage.open_storage(str(uri))
        texts = []
        seen = 0
        with fs.open(path, "r", encoding="utf-8", errors="replace") as f:
            for seen, text in enumerate(iter_json_array(f), start=1):
                if stop is not None and seen > stop:
                    break
                if seen > first:
                    texts.append(text)
                if len(texts) == block:
                    yield {"record": np.array(texts, dtype=object)}
                    texts = []
        if stop is not None and seen < stop:
            raise ValueError(f"the validation split needs {stop} records, {uri} has {seen}")
        if texts:
            yield {"record": np.array(texts, dtype=object)}


class RecordRows:
    """ShareGPT4V records (JSON text) -> caption rows."""

    def __init__(self, image_root: str, coco: dict | None, rules: CaptionRules):
        self.image_root = image_root
        self.coco = coco
        self.rules = rules

    def __call__(self, batch: dict) -> dict:
        rows = [
            row
            for record in batch["record"]
            for row in sharegpt4v.sharegpt4v_caption_rows(json.loads(record), self.image_root, self.coco, self.rules)
        ]
        return captions.rows_to_columns(rows)


def validation_corpus(corpus: str, n_val: int) -> str:
    return f"{corpus}-1k" if n_val == 1000 else f"{corpus}-val{n_val}"


def read_record_rows(
    uris: list[str], first: int, stop: int | None, image_root: str, coco: dict | None, rules: CaptionRules
):
    """Caption rows of records first..stop-1: one streaming task per file, then actors."""
    records = ray.data.from_items([{"uri": u} for u in uris]).map_batches(
        stream_records, fn_kwargs={"first": first, "stop": stop}, batch_size=1, batch_format="numpy"
    )
    return records.map_batches(
        RecordRows,
        fn_constructor_args=(image_root, coco, rules),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1),
    )


def build_split(args, first: int, stop: int | None, coco: dict | None, split: str, corpus: str) -> tuple[str, dict]:
    reader = {
        "split": split,
        "validation_records": args.validation_records,
        "image_root": args.image_root.rstrip("/"),
        "coco": coco is not None,
    }
    args = argparse.Namespace(**{**vars(args), "corpus": corpus})
    params = cli.build_params(args, reader=reader)

    def read_rows(_):
        return read_record_rows([args.captions], first, stop, args.image_root, coco, params.caption_rules)

    inputs = [args.captions] + ([args.coco_captions] if args.coco_captions else [])
    return build.run_build(inputs, args.output, params, read_rows=read_rows)


def check_json_array(uri: str) -> None:
    """Refuse on the driver, before Ray starts any work, a caption file that is not a JSON
    array (reading its first kilobytes only; a break further on fails the streaming task)."""
    fs, path = storage.open_storage(uri)
    with fs.open(path, "r", encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    if not head.startswith("["):
        raise SystemExit(f"{uri} is not a JSON list of ShareGPT4V records")


def run(args: argparse.Namespace) -> dict[str, tuple[str, dict]]:
    check_json_array(args.captions)
    coco = sharegpt4v.coco_captions_by_file(load_json(args.coco_captions)) if args.coco_captions else None
    n_val = args.validation_records
    if n_val < 0:
        raise SystemExit(f"--validation-records must be >= 0, got {n_val}")
    return {
        "validation": build_split(args, 0, n_val, coco, "validation", validation_corpus(args.corpus, n_val)),
        "train": build_split(args, n_val, None, coco, "train", args.corpus),
    }


def main(argv=None) -> dict[str, str]:
    args = parse_args(argv)
    builds = cli.run_job(run, args)
    for split, (build_uri, manifest) in builds.items():
        print(f"[{split}]")
        cli.report(build_uri, manifest)
    return {split: uri for split, (uri, _) in builds.items()}


if __name__ == "__main__":
    main()
