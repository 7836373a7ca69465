"""The Ray Data pipeline every prepare job shares: rows -> caption groups -> shards -> manifest.

A corpus adds only its row reader (`prepare_<corpus>.py`). The build id is a digest of the
inputs and of every content-changing parameter; a finished build is reused, an interrupted
one resumes shard by shard (a shard is done when its index is published), and the
manifest is written last.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import ray

from pipelines import captions, shards, storage
from pipelines.stages import DownloadParams, ShardBuilder

log = logging.getLogger("pipelines.build")

# Bump when a stage changes what it writes: it enters every build id.
STAGES_VERSION = "1"
ROWS_PER_BUCKET = 200_000
MAX_SHUFFLE_PARTITIONS = 256


@dataclass(frozen=True)
class BuildParams:
    corpus: str
    shard_size: int = 1000
    download: DownloadParams = field(default_factory=DownloadParams)
    caption_rules: captions.CaptionRules = field(default_factory=captions.CaptionRules)


def content_params(params: BuildParams) -> dict:
    """The parameters that change shard content (network settings do not)."""
    download = asdict(params.download)
    for transient in ("timeout_s", "retries", "thread_count"):
        download.pop(transient)
    return {"corpus": params.corpus, "shard_size": params.shard_size, "download": download,
            "caption_rules": asdict(params.caption_rules), "stages_version": STAGES_VERSION}


def compute_input_digest(uri: str) -> str:
    fs, path = storage.open_storage(uri)
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def compute_build_id(input_digests: list[str], params: BuildParams) -> str:
    blob = json.dumps({"inputs": input_digests, "params": content_params(params)}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def code_version() -> str:
    """Git commit of the code (CLIPFORGE_CODE_VERSION wins: container images have no .git)."""
    if os.environ.get("CLIPFORGE_CODE_VERSION"):
        return os.environ["CLIPFORGE_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class ParseTsvRows:
    """Ray Data batch stage: TSV lines -> url, caption, reject reason, group bucket."""

    def __init__(self, rules: captions.CaptionRules, n_buckets: int):
        self.rules, self.n_buckets = rules, n_buckets

    def __call__(self, batch: dict) -> dict:
        parsed = [captions.parse_tsv_line(line, self.rules) for line in batch["text"]]
        urls = [p[0] for p in parsed]
        buckets = [int(captions.sample_key(u)[:8], 16) % self.n_buckets for u in urls]
        return {"url": np.array(urls, dtype=object),
                "caption": np.array([p[1] for p in parsed], dtype=object),
                "reason": np.array([p[2] for p in parsed], dtype=object),
                "bucket": np.array(buckets, dtype=np.int64)}


class GroupBucket:
    """Ray Data group stage: the rows of one URL bucket -> one row per caption group."""

    def __init__(self, rules: captions.CaptionRules, corpus: str):
        self.rules, self.corpus = rules, corpus

    def __call__(self, batch: dict) -> dict:
        groups = captions.group_captions(list(batch["url"]), list(batch["caption"]),
                                         self.rules, self.corpus)
        return {"key": np.array([g["key"] for g in groups], dtype=object),
                "group": np.array([json.dumps(g) for g in groups], dtype=object)}


def assign_shards(batch: dict, num_shards: int) -> dict:
    """Shard of a group = its key modulo the shard count: stable across runs."""
    batch["shard_id"] = np.array([int(k[:8], 16) % num_shards for k in batch["key"]],
                                 dtype=np.int64)
    return batch


def pack_shard(batch: dict) -> dict:
    order = np.argsort(batch["key"].astype(str), kind="stable")
    return {"shard_id": batch["shard_id"][:1],
            "groups": np.array([json.dumps([json.loads(batch["group"][i]) for i in order])],
                               dtype=object)}


class BuildShardTask:
    """Ray Data batch stage (batch of one shard spec) around the plain ShardBuilder."""

    def __init__(self, build_uri: str, download: DownloadParams):
        self.builder = ShardBuilder(build_uri, download)

    def __call__(self, batch: dict) -> dict:
        stats = [self.builder(int(s), json.loads(g))
                 for s, g in zip(batch["shard_id"], batch["groups"])]
        return {"stats": np.array([json.dumps(s) for s in stats], dtype=object)}


def count_reasons(parsed) -> Counter:
    rows = parsed.groupby("reason", num_partitions=1).count().take_all()
    return Counter({r["reason"]: r["count()"] for r in rows})


def plan_caption_groups(lines, params: BuildParams):
    """Parsed rows -> (materialised caption groups, row counts by reject reason)."""
    n_lines = lines.count()
    n_buckets = max(1, math.ceil(n_lines / ROWS_PER_BUCKET))
    parsed = lines.map_batches(ParseTsvRows, fn_constructor_args=(params.caption_rules, n_buckets),
                               batch_format="numpy", concurrency=1).materialize()
    reasons = count_reasons(parsed)
    kept = parsed.filter(lambda r: r["reason"] == "")
    groups = kept.groupby("bucket", num_partitions=n_buckets).map_groups(
        GroupBucket, fn_constructor_args=(params.caption_rules, params.corpus),
        batch_format="numpy", concurrency=1)
    return groups.materialize(), reasons


def plan_shards(groups, params: BuildParams) -> tuple[object, int]:
    n_groups = groups.count()
    num_shards = max(1, math.ceil(n_groups / params.shard_size))
    specs = groups.map_batches(assign_shards, fn_kwargs={"num_shards": num_shards},
                               batch_format="numpy")
    specs = specs.groupby("shard_id", num_partitions=min(num_shards, MAX_SHUFFLE_PARTITIONS))
    specs = specs.map_groups(pack_shard, batch_format="numpy")
    return specs, num_shards


def run_shard_tasks(specs, build_uri: str, params: BuildParams, todo: set[int],
                    num_shards: int) -> list[dict]:
    """Build the shards not yet published, logging progress as each one lands."""
    pending = specs.filter(lambda r: int(r["shard_id"]) in todo)
    results = pending.map_batches(BuildShardTask, fn_constructor_args=(build_uri, params.download),
                                  batch_size=1, batch_format="numpy", concurrency=(1, 64))
    stats, start, done = [], time.monotonic(), num_shards - len(todo)
    for row in results.iter_rows():
        stats.append(json.loads(row["stats"]))
        done += 1
        n_ok = sum(s["shard"]["n_samples"] for s in stats)
        log.info("shard %d/%d published (%d images written this run, %.1f img/s)", done,
                 num_shards, n_ok, n_ok / max(time.monotonic() - start, 1e-9))
    return stats


def collect_shard_stats(fs, build_path: str, num_shards: int) -> dict[int, dict]:
    found = {i: shards.read_shard_stats(fs, build_path, i) for i in range(num_shards)}
    return {i: s for i, s in found.items() if s is not None}


def assemble_manifest(build_id: str, inputs: list[dict], params: BuildParams,
                      reasons: Counter, shard_stats: dict[int, dict]) -> dict:
    failed = Counter()
    for s in shard_stats.values():
        failed.update(s["failures"])
    entries = [shard_stats[i]["shard"] for i in sorted(shard_stats)]
    written = sum(e["n_samples"] for e in entries)
    unique_images = sum(s["n_groups"] for s in shard_stats.values())
    counts = {"rows_read": sum(reasons.values()) - reasons.get(captions.HEADER, 0),
              "header_rows": reasons.get(captions.HEADER, 0),
              "rows_rejected": {r: n for r, n in sorted(reasons.items())
                                if r not in ("", captions.HEADER)},
              "unique_images": unique_images, "downloaded": written,
              "failed": dict(sorted(failed.items())), "written": written,
              "captions_written": sum(s["n_captions_written"] for s in shard_stats.values())}
    return {"corpus": params.corpus, "build_id": build_id, "format_version": 1,
            "params": content_params(params), "code_version": code_version(),
            "inputs": inputs, "counts": counts, "shards": entries,
            "created_unix": int(time.time())}


def arrow_filesystem(uri: str):
    """(pyarrow filesystem or None, path) for Ray Data I/O: `s3://` goes through s3fs so
    that a non-AWS endpoint (AWS_ENDPOINT_URL) is honoured."""
    if not uri.startswith("s3://"):
        return None, uri
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    fs, path = storage.open_storage(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def read_text_lines(uris: list[str]):
    """Ray Data dataset of the lines of text files (one column "text")."""
    fs, _ = arrow_filesystem(uris[0])
    paths = [arrow_filesystem(u)[1] for u in uris]
    return ray.data.read_text(paths, filesystem=fs, drop_empty_lines=True)


def run_build(input_uris: list[str], output_root: str, params: BuildParams, *,
              read_lines) -> tuple[str, dict]:
    """Build (or reuse) the corpus; returns (build uri, manifest)."""
    inputs = [{"uri": u, "sha256": compute_input_digest(u)} for u in input_uris]
    build_id = compute_build_id([i["sha256"] for i in inputs], params)
    build_uri = storage.join(output_root, params.corpus, build_id)
    fs, build_path = storage.open_storage(build_uri)
    if fs.exists(storage.join(build_path, shards.MANIFEST)):
        log.info("build %s is complete already: nothing to do", build_uri)
        return build_uri, shards.read_manifest(build_uri)
    for folder in (shards.SHARDS_DIR, shards.INDEX_DIR):
        storage.remove_stale_temporaries(fs, storage.join(build_path, folder))
    groups, reasons = plan_caption_groups(read_lines(input_uris), params)
    specs, num_shards = plan_shards(groups, params)
    done = collect_shard_stats(fs, build_path, num_shards)
    if done:
        log.info("resuming %s: %d of %d shards already published", build_uri, len(done), num_shards)
    run_shard_tasks(specs, build_uri, params, set(range(num_shards)) - set(done), num_shards)
    manifest = assemble_manifest(build_id, inputs, params, reasons,
                                 collect_shard_stats(fs, build_path, num_shards))
    shards.write_manifest(fs, build_path, manifest)
    log.info("build %s complete: %s", build_uri, json.dumps(manifest["counts"]))
    return build_uri, manifest
