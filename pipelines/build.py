"""The Ray Data pipeline every prepare job shares:
caption rows -> caption groups -> staged shards -> content dedup -> shards -> manifest.

A corpus adds only its row reader (`cc12m.py`, `yfcc.py` + `prepare_yfcc15m.py`, `sharegpt4v.py` +
`prepare_sharegpt4v.py`; byte-ranged text reading in `text_input.py`): a Ray dataset of caption rows
(captions.ROW_COLUMNS: image source, caption, kind, origin, reject reason). The build id is a digest
of the inputs and of every content-changing parameter; a finished build is reused.

Two phases, each resumable shard by shard (a step of a shard is done when its index is
published, and indexes are published after their tars):
  A. fetch: each planned shard downloads its groups and is published under `staging/`;
  B. dedup: one plan, written once, merges samples whose stored image bytes are identical
     (the same picture behind different URLs or paths: sha256 of the decoded, resized and
     re-encoded JPEG) into the sample of the smallest key, which takes all their captions;
     each staged shard is then rewritten without the merged-away samples and published
     under `shards/` + `index/`.
The staging area is removed and the manifest written last.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.context import DataContext, ShuffleStrategy
from ray.data.expressions import col

from pipelines import captions, dedup, provenance, ray_setup, shards, storage
from pipelines.console import Progress, stage
from pipelines.stages import DownloadParams, ShardBuilder

log = logging.getLogger("pipelines.build")

# Bump when a stage changes what it writes: it enters every build id.
STAGES_VERSION = "4"  # 4: captions cleaned alike; JPEGs judged by their markers; lines cut at \n only
ROWS_PER_BUCKET = 200_000
MAX_SHUFFLE_PARTITIONS = 256
# Source buckets per grouping partition: the shuffle hashes bucket ids to partitions, and with
# one bucket each some partitions got three buckets and others none (the slowest grouping
# task did three times its share); many small buckets even the partitions out.
BUCKETS_PER_PARTITION = 8
# The image failure rate is judged only once this many images were tried (or all of them).
FAILURE_RATE_MIN_IMAGES = 200


class BuildAborted(RuntimeError):
    """The input looks wrong (too many failures): nothing more is fetched, no manifest."""


@dataclass(frozen=True)
class BuildParams:
    corpus: str
    shard_size: int = 1000
    download: DownloadParams = field(default_factory=DownloadParams)
    caption_rules: captions.CaptionRules = field(default_factory=captions.CaptionRules)
    reader: dict = field(default_factory=dict)  # the corpus reader's content settings
    max_failure_rate: float = 1.0  # abort above this fraction of rejected rows or images


def content_params(params: BuildParams) -> dict:
    """The parameters that change shard content (network settings do not)."""
    download = asdict(params.download)
    for transient in ("timeout_s", "retries", "thread_count"):
        download.pop(transient)
    return {
        "corpus": params.corpus,
        "shard_size": params.shard_size,
        "download": download,
        "caption_rules": asdict(params.caption_rules),
        "reader": params.reader,
        "stages_version": STAGES_VERSION,
    }


def compute_build_id(input_digests: list[str], params: BuildParams) -> str:
    blob = json.dumps({"inputs": input_digests, "params": content_params(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def add_buckets(batch: dict, n_buckets: int) -> dict:
    """Bucket of a row = digest of its image source: all rows of one image meet in one."""
    batch["bucket"] = np.array(
        [int(captions.sample_key(s)[:8], 16) % n_buckets for s in batch["source"]], dtype=np.int64
    )
    return batch


class GroupBucket:
    """Ray Data group stage: the rows of one source bucket -> one row per caption group."""

    def __init__(self, rules: captions.CaptionRules):
        self.rules = rules

    def __call__(self, batch: dict) -> dict:
        rows = [{c: batch[c][i] for c in ("source", "caption", "kind", "origin")} for i in range(len(batch["source"]))]
        groups = captions.group_captions(rows, self.rules)
        return {
            "key": np.array([g["key"] for g in groups], dtype=object),
            "group": np.array([json.dumps(g) for g in groups], dtype=object),
        }


def group_bucket(batch: dict, rules: captions.CaptionRules) -> dict:
    """GroupBucket as a plain task function, so the buckets are grouped on every CPU."""
    return GroupBucket(rules)(batch)


def assign_shards(batch: dict, num_shards: int) -> dict:
    """Shard of a group = its key modulo the shard count: stable across runs."""
    batch["shard_id"] = np.array([int(k[:8], 16) % num_shards for k in batch["key"]], dtype=np.int64)
    return batch


def pack_shard(batch: dict) -> dict:
    order = np.argsort(batch["key"].astype(str), kind="stable")
    return {
        "shard_id": batch["shard_id"][:1],
        "groups": np.array([json.dumps([json.loads(batch["group"][i]) for i in order])], dtype=object),
    }


@functools.lru_cache(maxsize=4)
def shard_builder(staging_uri: str, download: DownloadParams) -> ShardBuilder:
    """This process's builder for a staging root (its fetcher imports img2dataset once per
    process)."""
    return ShardBuilder(staging_uri, download)


def build_shards(batch: dict, build_uri: str, download: DownloadParams) -> dict:
    """Ray Data batch stage (shard specs) around the plain ShardBuilder: phase A, published
    under the build's staging area. A plain task, not an actor: it runs in the worker
    processes planning already started, where an actor pool would start new ones."""
    specs = [(int(s), json.loads(g)) for s, g in zip(batch["shard_id"], batch["groups"])]
    return run_builder(specs, 0, 1, build_uri, download)


def build_task(batch: dict, build_uri: str, download: DownloadParams) -> dict:
    """build_shards for one task composed on the driver (compose_tasks): whole shards, or one
    part of a shard, staged under its part root."""
    task = json.loads(batch["task"][0])
    specs = [(int(shard_id), groups) for shard_id, groups in task["specs"]]
    return run_builder(specs, task["part"], task["n_parts"], build_uri, download)


def run_builder(
    specs: list[tuple[int, list[dict]]], part: int, n_parts: int, build_uri: str, download: DownloadParams
) -> dict:
    staging = dedup.part_root(build_uri, part, n_parts) if n_parts > 1 else dedup.staging_path(build_uri)
    stats = shard_builder(staging, download).build_many(specs)
    return {"stats": np.array([json.dumps({**s, "n_parts": n_parts}) for s in stats], dtype=object)}


def count_block_reasons(block: pa.Table) -> pa.Table:
    """(reason, count) rows of one block of caption rows."""
    counts = pc.value_counts(block["reason"])
    return pa.table({"reason": counts.field("values"), "count": counts.field("counts")})


def count_reasons(rows) -> Counter:
    """Row counts by reject reason of materialised rows: counted in each block where it lies
    (no shuffle), summed here as they stream in, so the driver holds one Counter whatever
    the corpus size."""
    counted = rows.select_columns(["reason"]).map_batches(count_block_reasons, batch_format="pyarrow", batch_size=None)
    reasons = Counter()
    for row in counted.iter_rows():
        reasons[row["reason"]] += int(row["count"])
    return reasons


def plan_caption_groups(rows, params: BuildParams):
    """Caption rows -> (materialised caption groups, row counts by reject reason). Grouping
    runs as plain tasks, one per bucket partition, on every CPU."""
    rows = rows.materialize()
    n_partitions = max(1, math.ceil(rows.count() / ROWS_PER_BUCKET))
    reasons = count_reasons(rows)
    check_row_failures(reasons, params.max_failure_rate)
    # Buckets before the filter: a block whose rows are all rejects filters to an empty one,
    # which a map stage after it would skip and pass on without columns, and the shuffle
    # could not concatenate that block with the others (Ray 2.60).
    kept = rows.map_batches(
        add_buckets, fn_kwargs={"n_buckets": n_partitions * BUCKETS_PER_PARTITION}, batch_format="numpy"
    ).filter(expr=col("reason") == "")
    # A function (not an actor pool) also keeps map_groups fused with the shuffle's reduce,
    # which drops the empty block of a partition that no bucket hashed to: in Ray 2.60 such a
    # block has no columns, and a later shuffle fails to concatenate it with the others.
    groups = kept.groupby("bucket", num_partitions=n_partitions).map_groups(
        group_bucket, fn_kwargs={"rules": params.caption_rules}, batch_format="numpy"
    )
    return groups.materialize(), reasons


def check_row_failures(reasons: Counter, max_rate: float) -> None:
    rows = sum(n for r, n in reasons.items() if r != captions.HEADER)
    rejected = sum(n for r, n in reasons.items() if r not in ("", captions.HEADER))
    if rows and rejected / rows > max_rate:
        raise BuildAborted(
            f"{rejected} of {rows} input rows rejected ({rejected / rows:.1%} > "
            f"--max-failure-rate {max_rate:.1%}): {dict(reasons)}; is the input "
            "in the expected layout?"
        )


def check_image_failures(stats: list[dict], remaining: int, max_rate: float) -> None:
    tried = sum(s["n_groups"] for s in stats)
    failed = sum(sum(s["failures"].values()) for s in stats)
    if (tried >= FAILURE_RATE_MIN_IMAGES or remaining == 0) and tried and failed / tried > max_rate:
        reasons = Counter()
        for s in stats:
            reasons.update(s["failures"])
        raise BuildAborted(
            f"{failed} of {tried} images failed ({failed / tried:.1%} > "
            f"--max-failure-rate {max_rate:.1%}): {dict(reasons)}"
        )


def renumber_shards(batch: dict, dense: dict[int, int]) -> dict:
    batch["shard_id"] = np.array([dense[int(i)] for i in batch["shard_id"]], dtype=np.int64)
    return batch


def plan_shards(groups, params: BuildParams) -> tuple[object, list[int]]:
    """(one spec row per shard, the shard ids 0..n-1). A group's shard is its key's hash bucket;
    the buckets that hold groups are numbered in order without gaps (a bucket the hash leaves
    empty gets no number), so ids stay a function of the input and `{000000..n-1}` names every
    tar. The groups are packed by bucket first (one shuffle); only the packed specs' small
    shard-id column is read back, and the specs are renumbered where a bucket was empty."""
    n_groups = groups.count()
    num_shards = max(1, math.ceil(n_groups / params.shard_size))
    packed = (
        groups.map_batches(assign_shards, fn_kwargs={"num_shards": num_shards}, batch_format="numpy")
        .groupby("shard_id", num_partitions=min(num_shards, MAX_SHUFFLE_PARTITIONS))
        .map_groups(pack_shard, batch_format="numpy")
    )
    if not n_groups:
        return packed, []
    packed = packed.materialize()
    buckets = sorted(
        int(i)
        for batch in packed.select_columns(["shard_id"]).iter_batches(batch_format="numpy")
        for i in batch["shard_id"]
    )
    shard_ids = list(range(len(buckets)))
    if buckets == shard_ids:  # no bucket was left empty: the ids are dense already
        return packed, shard_ids
    dense = {bucket: i for i, bucket in enumerate(buckets)}
    return packed.map_batches(renumber_shards, fn_kwargs={"dense": dense}, batch_format="numpy"), shard_ids


def run_shard_tasks(specs, build_uri: str, params: BuildParams, todo: set[int], num_shards: int) -> list[dict]:
    """Phase A: fetch the shards not yet staged (the last few in parts, final_round_parts),
    logging progress as each shard lands, and abort when the failure rate says the input is
    wrong."""
    if not todo:
        return []
    n_cpus = ray_setup.cluster_cpus()
    ordered = sorted(todo)
    composed = len(ordered) * params.shard_size <= DRIVER_TASKS_MAX_GROUPS
    # A large build streams its tasks from the specs: its last round is a small share of it.
    n_split, n_parts = final_round_parts(len(ordered), n_cpus) if composed else (0, 1)
    whole = ordered[: len(ordered) - n_split]
    split = ordered[len(ordered) - n_split :]
    dedup.remove_staged_parts(*storage.open_storage(build_uri), todo)  # of an earlier split
    if split:
        log.info(
            "the last %d of %d shards are fetched in %d parts each, over %d CPUs",
            len(split),
            len(ordered),
            n_parts,
            n_cpus,
        )
    results = download_stage(specs, whole, split, n_parts, build_uri, params, n_cpus, composed)
    stats = []
    start = time.monotonic()
    parts_done = Counter()
    n_units = len(whole) + len(split) * n_parts
    with Progress("prepare", num_shards, "shard", start=num_shards - len(todo)) as progress:
        for row in results.iter_rows():
            stats.append(json.loads(row["stats"]))
            parts_done[stats[-1]["shard"]["id"]] += 1
            n_ok = sum(s["shard"]["n_samples"] for s in stats)
            progress.update(
                int(parts_done[stats[-1]["shard"]["id"]] == stats[-1]["n_parts"]),
                images=n_ok,
                **{"img/s": n_ok / max(time.monotonic() - start, 1e-9)},
            )
            check_image_failures(stats, n_units - len(stats), params.max_failure_rate)
    return stats


def download_stage(
    specs,
    whole: list[int],
    split: list[int],
    n_parts: int,
    build_uri: str,
    params: BuildParams,
    n_cpus: int,
    composed: bool,
):
    """The dataset of per-unit stats rows. The tasks of a small build are composed on the
    driver, in the order they are to run (compose_tasks); a large build's specs stream into
    tasks of `per_task` shards (`per_task` rows a block, so each task gets that many whatever
    blocks the shuffle made)."""
    kwargs = {"build_uri": build_uri, "download": params.download}
    if composed:
        rows = specs.filter(expr=col("shard_id").is_in(whole + split)).iter_rows()
        tasks = compose_tasks(
            {int(r["shard_id"]): json.loads(r["groups"]) for r in rows}, whole, split, n_parts, n_cpus
        )
        results = ray.data.from_items(tasks, override_num_blocks=len(tasks)).map_batches(
            build_task, fn_kwargs=kwargs, batch_size=1, batch_format="numpy"
        )
    else:
        per_task = shards_per_task(len(whole), n_cpus)
        results = (
            specs.filter(expr=col("shard_id").is_in(whole))
            .repartition(target_num_rows_per_block=per_task)
            .map_batches(build_shards, fn_kwargs=kwargs, batch_size=per_task, batch_format="numpy")
        )
    # Every CPU's first download task at once: with Ray Data's per-operator reservation (its
    # default) the second task started ~1 s after the first (measured), on a stage whose only
    # upstream work is a filter of the materialised specs.
    results.context.op_resource_reservation_enabled = False
    return results


def compose_tasks(
    groups: dict[int, list[dict]], whole: list[int], split: list[int], n_parts: int, n_cpus: int
) -> list[dict]:
    """Download tasks (one JSON row each) in the order Ray Data dispatches them: the whole
    shards (whole_shard_tasks), then each split shard's parts one a task (part p holds every
    n_parts-th group from p), so that the parts fill the last round on every CPU."""
    tasks = [
        {"part": 0, "n_parts": 1, "specs": [[i, groups[i]] for i in task]} for task in whole_shard_tasks(whole, n_cpus)
    ]
    tasks += [
        {"part": p, "n_parts": n_parts, "specs": [[i, groups[i][p::n_parts]]]} for i in split for p in range(n_parts)
    ]
    return [{"task": json.dumps(task)} for task in tasks]


def whole_shard_tasks(shard_ids: list[int], n_cpus: int) -> list[list[int]]:
    """Shards in tasks of at most MAX_SHARDS_PER_TASK: as few tasks as that allows, their
    number a multiple of the CPUs and their sizes within one shard of each other, largest
    first, so every CPU gets the same work in whatever order the tasks finish. Few tasks, as
    each task's end leaves its threads with nothing to fetch while its last shard is written."""
    if not shard_ids:
        return []
    n_tasks = min(len(shard_ids), n_cpus * math.ceil(len(shard_ids) / (n_cpus * MAX_SHARDS_PER_TASK)))
    sizes = [len(shard_ids) // n_tasks + (k < len(shard_ids) % n_tasks) for k in range(n_tasks)]
    starts = np.cumsum([0, *sizes])
    return [shard_ids[a:b] for a, b in zip(starts[:-1], starts[1:])]


MAX_SHARDS_PER_TASK = 4
MAX_PARTS_PER_SHARD = 8
# Builds of at most this many groups to fetch get their last shards in parts: their tasks are
# composed on the driver, which then holds every spec (a few tens of MB). A larger build runs
# many rounds of tasks, so its last round is a small share of it.
DRIVER_TASKS_MAX_GROUPS = 200_000


def shards_per_task(n_shards: int, n_cpus: int) -> int:
    """Shards one download task builds, streaming them through its threads (see
    ShardBuilder.build_many): up to MAX_SHARDS_PER_TASK, fewer when there are too few shards
    for each CPU to get at least two tasks (so the last tasks still spread over every CPU).
    A task retried after its worker died fetches its shards again; so a task stays small."""
    return max(1, min(MAX_SHARDS_PER_TASK, n_shards // (2 * n_cpus)))


def final_round_parts(n_shards: int, n_cpus: int) -> tuple[int, int]:
    """(how many of the last shards to fetch in parts, parts each). Shards are of equal size,
    so r = n_shards mod n_cpus of them would make a last round on r CPUs while the others
    idle: 9 shards on 2 CPUs took 5 shard-times, the last one on half the threads. Fetching
    those r in n_cpus / gcd(r, n_cpus) parts each gives lcm(r, n_cpus) equal parts, the same
    number for every CPU (4.5 shard-times). Parts are staged apart and joined when the shard
    is published (dedup.publish_shard), which writes the same shard as a whole fetch would.
    Not beyond MAX_PARTS_PER_SHARD parts: where that many are needed, r is 1 of very many
    CPUs, or all but a few of them."""
    r = n_shards % n_cpus
    n_parts = n_cpus // math.gcd(r, n_cpus)
    return (r, n_parts) if r and n_parts <= MAX_PARTS_PER_SHARD else (0, 1)


def run_dedup(fs, build_path: str, build_uri: str, shard_ids: list[int], shard_size: int) -> None:
    """Phase B: write the dedup plan once, then publish every shard not yet published."""
    todo = [i for i in shard_ids if not fs.exists(shards.shard_paths(build_path, i)[1])]
    if not todo:
        return
    if not dedup.plan_exists(fs, build_path):
        duplicates = find_duplicates(fs, build_path, shard_ids, len(shard_ids) * shard_size)
        dedup.write_plan(fs, build_path, duplicates, shard_ids)
        log.info("dedup: %d images merged into %d others", sum(len(d["drop"]) for d in duplicates), len(duplicates))
    ray.get(
        [
            _publish_shards.remote(build_uri, todo[i::PUBLISH_TASKS])
            for i in range(PUBLISH_TASKS)
            if todo[i::PUBLISH_TASKS]
        ]
    )


PUBLISH_TASKS = 16  # at most this many side by side; Ray runs as many as it has CPUs


@ray.remote(max_retries=3)
def _publish_shards(build_uri: str, shard_ids: list[int]) -> None:
    """Phase B for some shards (plain tasks: no actor start-up; publishing is idempotent, so
    a task retried after its node died is safe)."""
    fs, build_path = storage.open_storage(build_uri)
    for shard_id in shard_ids:
        dedup.publish_shard(fs, build_path, shard_id)


def find_duplicates(fs, build_path: str, shard_ids: list[int], max_rows: int) -> list[dict]:
    """Groups of samples with identical image bytes, over the staged index of each shard (or
    its published one where it has none): the index rows are shuffled by a bucket of their
    digest, ROWS_PER_BUCKET rows a bucket, and each bucket finds its duplicates in one sort.
    A build of at most one bucket's rows (`max_rows`, shards x shard size, bounds them) is one
    bucket: one task reads every index and sorts, without the shuffle's stages around it."""
    paths = []
    part_sets = dedup.staged_part_sets(fs, build_path)
    for i in shard_ids:
        staged = dedup.staged_index_path(build_path, i)
        if fs.exists(staged):
            paths.append(staged)
        elif i in part_sets:
            paths += [shards.shard_paths(root, i)[1] for root in part_sets[i]]
        else:
            paths.append(shards.shard_paths(build_path, i)[1])
    arrow_fs = storage.arrow_filesystem_for(fs)
    if max_rows <= ROWS_PER_BUCKET:
        return [json.loads(p) for p in ray.get(_duplicates_in_indexes.remote(paths, arrow_fs))]
    index = ray.data.read_parquet(paths, filesystem=arrow_fs).select_columns(list(dedup.PLAN_COLUMNS))
    n_buckets = max(1, min(MAX_SHUFFLE_PARTITIONS, math.ceil(index.count() / ROWS_PER_BUCKET)))
    groups = (
        index.map_batches(add_digest_buckets, fn_kwargs={"n_buckets": n_buckets}, batch_format="numpy")
        .groupby("bucket", num_partitions=n_buckets)
        .map_groups(dedup.duplicates_in_bucket, batch_format="numpy")
    )
    return [json.loads(row["plan"]) for row in groups.take_all()]


@ray.remote
def _duplicates_in_indexes(paths: list[str], arrow_fs) -> list[str]:
    """The merge plans of the index files `paths` taken as one digest bucket."""
    table = pq.read_table(paths, filesystem=arrow_fs, columns=list(dedup.PLAN_COLUMNS))
    batch = {c: table[c].to_numpy(zero_copy_only=False) for c in dedup.PLAN_COLUMNS}
    return list(dedup.duplicates_in_bucket(batch)["plan"])


def add_digest_buckets(batch: dict, n_buckets: int) -> dict:
    batch["bucket"] = dedup.digest_bucket(batch[shards.DIGEST]) % n_buckets
    return batch


def collect_shard_stats(fs, build_path: str, shard_ids: list[int]) -> dict[int, dict]:
    found = {i: shards.read_shard_stats(fs, build_path, i) for i in shard_ids}
    return {i: s for i, s in found.items() if s is not None}


def staged_or_published(fs, build_path: str, shard_ids: list[int]) -> set[int]:
    """Shards that phase A need not fetch again: staged whole or in a complete set of parts,
    or published."""
    staged = collect_shard_stats(fs, storage.join(build_path, dedup.STAGING_DIR), shard_ids)
    parts = set(dedup.staged_part_sets(fs, build_path)) & set(shard_ids)
    return set(staged) | parts | set(collect_shard_stats(fs, build_path, shard_ids))


def assemble_manifest(
    build_id: str, inputs: list[dict], params: BuildParams, reasons: Counter, shard_stats: dict[int, dict]
) -> dict:
    failed = Counter()
    for s in shard_stats.values():
        failed.update(s["failures"])
    entries = [shard_stats[i]["shard"] for i in sorted(shard_stats)]
    written = sum(e["n_samples"] for e in entries)
    merged = sum(s.get("duplicates_merged", 0) for s in shard_stats.values())
    counts = {
        "rows_read": sum(reasons.values()) - reasons.get(captions.HEADER, 0),
        "header_rows": reasons.get(captions.HEADER, 0),
        "rows_rejected": {r: n for r, n in sorted(reasons.items()) if r not in ("", captions.HEADER)},
        "unique_sources": sum(s["n_groups"] for s in shard_stats.values()),
        "downloaded": written + merged,
        "failed": dict(sorted(failed.items())),
        "duplicates_merged": merged,
        "written": written,
        "captions_written": sum(s["n_captions_written"] for s in shard_stats.values()),
    }
    return {
        "corpus": params.corpus,
        "build_id": build_id,
        "format_version": 3,
        "params": content_params(params),
        "code_version": provenance.code_version(),
        "inputs": inputs,
        "counts": counts,
        "shards": entries,
        "created_unix": int(time.time()),
    }


@ray.remote(num_cpus=1)
def _file_sha256(uri: str) -> str:
    return storage.file_sha256(uri)


DRIVER_HASH_MAX_BYTES = 64 << 20  # local inputs up to this size are hashed by the driver


def input_digests(uris: list[str]) -> list[str]:
    """sha256 of each input file, one Ray task per file: side by side, and read where Ray puts
    the task (a cluster node near the bucket), not streamed through the driver. A small local
    file is hashed by the driver: faster than a task's round trip and a worker's start."""
    here = [_hashed_here(u) for u in uris]
    remote = iter(ray.get([_file_sha256.remote(u) for u, h in zip(uris, here) if h is None]))
    return [h if h is not None else next(remote) for h in here]


def _hashed_here(uri: str) -> str | None:
    fs, path = storage.open_storage(uri)
    if "file" not in fs.protocol or fs.size(path) > DRIVER_HASH_MAX_BYTES:
        return None
    return storage.file_sha256(uri)


@contextlib.contextmanager
def sort_shuffle():
    """Build with Ray Data's task-based sort shuffle: Ray 2.60's default (SHUFFLE_V2) starts
    aggregator actors for each groupby, new processes that cost a small build most of its
    planning time (300 rows: 6.7 s -> 1.7 s on two cores), where the sort shuffle's tasks run
    in the workers already started."""
    context = DataContext.get_current()
    previous, context.shuffle_strategy = context.shuffle_strategy, ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.shuffle_strategy = previous


@sort_shuffle()
def run_build(input_uris: list[str], output_root: str, params: BuildParams, *, read_rows) -> tuple[str, dict]:
    """Build (or reuse) the corpus from `read_rows(input_uris)` (a dataset of caption rows);
    returns (build uri, manifest)."""
    inputs = [{"uri": u, "sha256": d} for u, d in zip(input_uris, input_digests(input_uris))]
    build_id = compute_build_id([i["sha256"] for i in inputs], params)
    build_uri = storage.join(output_root, params.corpus, build_id)
    fs, build_path = storage.open_storage(build_uri)
    if fs.exists(storage.join(build_path, shards.MANIFEST)):
        log.info("build %s is complete already: nothing to do", build_uri)
        return build_uri, shards.read_manifest(build_uri)
    dedup.remove_temporaries(fs, build_path)
    with stage("prepare/plan", "caption groups and shards"):
        groups, reasons = plan_caption_groups(read_rows(input_uris), params)
        specs, shard_ids = plan_shards(groups, params)
        del groups  # the packed specs hold every group now: free their object-store copy
        done = staged_or_published(fs, build_path, shard_ids)
    if done:
        log.info("resuming %s: %d of %d shards already fetched", build_uri, len(done), len(shard_ids))
    with stage("prepare/download", f"{len(shard_ids) - len(done)} of {len(shard_ids)} shards"):
        run_shard_tasks(specs, build_uri, params, set(shard_ids) - done, len(shard_ids))
    fs.invalidate_cache()  # s3fs lists from a cache: the workers wrote what it has not seen
    with stage("prepare/dedup", "exact duplicates across shards"):
        run_dedup(fs, build_path, build_uri, shard_ids, params.shard_size)
    fs.invalidate_cache()
    with stage("prepare/publish", "manifest"):
        manifest = assemble_manifest(build_id, inputs, params, reasons, collect_shard_stats(fs, build_path, shard_ids))
        dedup.remove_staging(fs, build_path)
        shards.write_sizes(fs, build_path, manifest["shards"])
        shards.write_manifest(fs, build_path, manifest)
    return build_uri, manifest
