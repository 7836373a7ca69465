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
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from pipelines import build, captions, cli, storage, text_input, yfcc  # noqa: E402
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


REJECT_MISSING_METADATA = "missing_metadata"
N_TABS = yfcc.N_COLUMNS - 1
N_TABS_WITH_HASH = yfcc.N_COLUMNS_WITH_HASH - 1


def parse_subset(batch: dict) -> dict:
    ids = [i for i in (yfcc.parse_subset_line(decode_line(line)) for line in batch["text"]) if i is not None]
    return {"photo_id": np.array(ids, dtype=np.int64)}


@ray.remote
def sorted_unique_ids(*blocks) -> np.ndarray:
    """The subset's photo ids, sorted and unique: 15 M ids are 120 MB, small enough to give
    every metadata task whole (zero-copy from the object store), never held by the driver.
    `blocks` are Arrow tables: Ray 2.60 can hand on an empty block without columns (seen at
    3 M subset lines), which has no photo_id column to convert, so empty blocks are skipped."""
    ids = [block["photo_id"].to_numpy() for block in blocks if block.num_rows]
    return np.unique(np.concatenate(ids)) if ids else np.array([], dtype=np.int64)


def line_photo_id(line: str) -> int:
    """The photo id of a metadata line, read without splitting the other columns; NO_PHOTO_ID
    for a line with neither 23 nor 25 columns or an unreadable id."""
    n_tabs = line.count("\t")
    if n_tabs not in (N_TABS, N_TABS_WITH_HASH):
        return yfcc.NO_PHOTO_ID
    fields = line.split("\t", 2)
    photo_id = yfcc.parse_photo_id(fields[0] if n_tabs == N_TABS else fields[1])
    return yfcc.NO_PHOTO_ID if photo_id is None else photo_id


def select_subset(batch: dict, subset_ref, rules: CaptionRules) -> dict:
    """Ray Data stage over metadata lines: the caption rows of the photos the subset lists (and
    of malformed lines, counted), with each photo's position in the subset (`subset_pos`, -1
    for a malformed line) so that the subset ids no line names can be counted afterwards.
    Only the selected lines (15 M of 100 M) are parsed in full."""
    subset = ray.get(subset_ref)
    ids = np.array([line_photo_id(line) for line in batch["text"]], dtype=np.int64)
    pos = np.searchsorted(subset, ids).clip(max=max(len(subset) - 1, 0))
    listed = (subset[pos] == ids) if len(subset) else np.zeros(len(ids), bool)
    rows = []
    positions = []
    for i in np.flatnonzero(listed | (ids == yfcc.NO_PHOTO_ID)):
        record = yfcc.parse_metadata_line(decode_line(batch["text"][i]))
        photo_rows = yfcc.yfcc_caption_rows(record, rules)
        rows.extend(photo_rows)
        positions.extend([int(pos[i]) if listed[i] else -1] * len(photo_rows))
    return {**captions.rows_to_columns(rows), "subset_pos": np.array(positions, dtype=np.int64)}


def select_subset_chunks(batch: dict, subset_ref, rules: CaptionRules) -> dict:
    """select_subset over the lines of byte ranges it reads itself (text_input.line_chunks)."""
    lines = [
        line
        for uri, start, end in zip(batch["uri"], batch["start"], batch["end"])
        for line in text_input.read_chunk_lines(str(uri), int(start), int(end))
    ]
    return select_subset({"text": lines}, subset_ref, rules)


def count_missing(selected, n_subset: int) -> int:
    """How many subset ids no metadata line names, from the selected rows' positions: a bitmap
    of one byte per subset id (15 MB for YFCC15M), filled as the position column streams by."""
    seen = np.zeros(n_subset, dtype=bool)
    for batch in selected.select_columns(["subset_pos"]).iter_batches(batch_format="numpy"):
        found = batch["subset_pos"]
        seen[found[found >= 0]] = True
    return int(n_subset - seen.sum())


def missing_rows(batch: dict) -> dict:
    n = len(batch["id"])
    return captions.rows_to_columns([{"reason": REJECT_MISSING_METADATA}] * n)


def joined_rows(frame, rules: CaptionRules) -> dict:
    """Rows of an already-joined table (pandas batches) -> caption rows."""
    records = [yfcc.joined_record(r) for r in frame.to_dict("records")]
    return captions.rows_to_columns([row for r in records for row in yfcc.yfcc_caption_rows(r, rules)])


def read_joined_rows(uris: list[str], rules: CaptionRules):
    fs, _ = storage.arrow_filesystem(uris[0])
    paths = [storage.arrow_filesystem(u)[1] for u in uris]
    reader = ray.data.read_parquet if uris[0].endswith(".parquet") else ray.data.read_csv
    return reader(paths, filesystem=fs).map_batches(joined_rows, fn_kwargs={"rules": rules}, batch_format="pandas")


def read_metadata_rows(metadata: list[str], subset: str, rules: CaptionRules):
    """Subset ids left-joined with the metadata records, as a broadcast semi-join: the sorted
    subset ids (one object, built by a task) go to every metadata task, which keeps the lines
    they list and parses only those, on every CPU Ray has. Nothing of the 100 M-line metadata
    is shuffled. A subset id that no line names gives one `missing_metadata` row; a photo id
    on several metadata lines gives the captions of each (YFCC100M's ids are unique)."""
    id_blocks = text_input.read_text_lines([subset]).map_batches(parse_subset, batch_format="numpy")
    subset_ref = sorted_unique_ids.remote(*id_blocks.to_arrow_refs())
    selected = (
        text_input.line_chunks(metadata)
        .map_batches(
            select_subset_chunks,
            fn_kwargs={"subset_ref": subset_ref, "rules": rules},
            batch_size=1,
            batch_format="numpy",
        )
        .materialize()
    )
    n_subset = ray.get(_length.remote(subset_ref))
    n_missing = count_missing(selected, n_subset)
    rows = selected.drop_columns(["subset_pos"])
    if not n_missing:
        return rows
    return rows.union(ray.data.range(n_missing).map_batches(missing_rows, batch_format="numpy"))


@ray.remote
def _length(array: np.ndarray) -> int:
    return len(array)


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
