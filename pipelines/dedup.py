"""Content dedup between the fetch phase and the published shards (see pipelines/build.py).

The dedup key is the sha256 of the stored JPEG, i.e. of the image after decoding, upright
RGB conversion, resizing and re-encoding with fixed settings: the same picture reached
through two URLs or paths gives the same bytes, whatever its source encoding. (Near
duplicates, such as re-compressed or re-scaled copies, are not merged.) In a set of
duplicates the smallest key stays; its caption group becomes the union of all their
captions, its own first, then the others' in key order, each text once.

The plan is written once per build as one small JSON file per shard, then a marker, so a
resumed phase B applies exactly the same plan.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np

from pipelines import shards, storage

STAGING_DIR = "staging"
PLAN_DIR = "dedup"
PARTS_DIR = "parts"  # staging/parts/<part>-of-<n_parts>/{shards,index}/: shards fetched in parts
PART_OF = "-of-"
PLAN_DONE = "_complete"
PLAN_COLUMNS = ("key", "shard", shards.DIGEST, "captions_json")


def staging_path(build_path: str) -> str:
    return storage.join(build_path, STAGING_DIR)


def staged_index_path(build_path: str, shard_id: int) -> str:
    return shards.shard_paths(staging_path(build_path), shard_id)[1]


def plan_path(build_path: str, shard_id: int) -> str:
    return storage.join(staging_path(build_path), PLAN_DIR, f"{shards.shard_name(shard_id)}.json")


def digest_bucket(digests) -> np.ndarray:
    """Shuffle bucket of each image digest (hex): every copy of one image meets in one."""
    return np.array([int(d[:8], 16) for d in digests], dtype=np.int64)


def duplicates_in_bucket(batch: dict) -> dict:
    """Ray Data group stage (the index rows of one digest bucket) -> one merge plan per digest
    that two or more samples share. Found by one sort of the bucket's digests, so the Python
    work per image is constant and only the (few) duplicates are merged one by one."""
    digests = np.asarray(batch[shards.DIGEST]).astype(str)
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.array([], int)
    sizes = np.diff(np.r_[starts, len(ordered)])
    plans = [
        merge_duplicates(
            *(np.asarray(batch[c])[order[start : start + size]] for c in ("key", "shard", "captions_json"))
        )
        for start, size in zip(starts[sizes > 1], sizes[sizes > 1])
    ]
    return {"plan": np.array(plans, dtype=object)}


def merge_duplicates(keys, shard_ids, captions_jsons) -> str:
    """The plan (JSON) of one set of identical images: the smallest key stays and takes every
    caption once, its own first, then the others' in key order."""
    rows = sorted(zip(keys, shard_ids, captions_jsons))
    merged = []
    texts = set()
    for _, _, captions_json in rows:
        for caption in json.loads(captions_json):
            if caption["text"] not in texts:
                texts.add(caption["text"])
                merged.append(caption)
    keep_key, keep_shard, _ = rows[0]
    return json.dumps(
        {
            "keep": [str(keep_key), int(keep_shard)],
            "captions": merged,
            "drop": [[str(k), int(s)] for k, s, _ in rows[1:]],
        }
    )


def shard_edits(duplicates: list[dict], shard_ids: list[int]) -> dict[int, dict]:
    """Per shard: keys to drop and caption groups to replace."""
    edits = {i: {"drop": [], "captions": {}} for i in shard_ids}
    for d in duplicates:
        key, shard = d["keep"]
        edits[shard]["captions"][key] = d["captions"]
        for dropped, dropped_shard in d["drop"]:
            edits[dropped_shard]["drop"].append(dropped)
    return edits


def write_plan(fs, build_path: str, duplicates: list[dict], shard_ids: list[int]) -> None:
    for shard_id, edit in shard_edits(duplicates, shard_ids).items():
        data = json.dumps(edit, sort_keys=True).encode("utf-8")
        storage.write_bytes_atomic(fs, plan_path(build_path, shard_id), data)
    marker = storage.join(staging_path(build_path), PLAN_DIR, PLAN_DONE)
    storage.write_bytes_atomic(fs, marker, b"")


def plan_exists(fs, build_path: str) -> bool:
    return fs.exists(storage.join(staging_path(build_path), PLAN_DIR, PLAN_DONE))


def apply_edits(samples: list[dict], edit: dict) -> list[dict]:
    drop = set(edit["drop"])
    new_captions = edit["captions"]
    kept = []
    for sample in samples:
        if sample[shards.KEY] in drop:
            continue
        if sample[shards.KEY] in new_captions:
            meta = json.loads(sample[shards.META])
            meta["captions"] = new_captions[sample[shards.KEY]]
            sample = {**sample, shards.META: json.dumps(meta, sort_keys=True)}
        kept.append(sample)
    return kept


def publish_shard(fs, build_path: str, shard_id: int) -> dict:
    """Staged shard (whole, or a complete set of parts) -> published shard under the plan;
    the staged copies are removed after. Idempotent: a task retried after its node died
    (having published, maybe not yet removed the staged copies) finds the published index,
    written last, and only tidies up."""
    staged = staging_path(build_path)
    published = shards.read_shard_stats(fs, build_path, shard_id)
    if published is not None:
        remove_staged(fs, build_path, shard_id)
        return published["shard"]
    stats = shards.read_shard_stats(fs, staged, shard_id)
    edit = json.loads(storage.read_bytes(fs, plan_path(build_path, shard_id)))
    if stats is not None and not edit["drop"] and not edit["captions"]:
        return promote_staged(fs, build_path, shard_id, stats["shard"])
    roots = [staged] if stats is not None else staged_part_sets(fs, build_path)[shard_id]
    samples, stats = read_staged(fs, roots, shard_id)
    kept = apply_edits(samples, edit)
    stats["duplicates_merged"] = len(samples) - len(kept)
    stats["n_captions_written"] = sum(len(json.loads(s[shards.META])["captions"]) for s in kept)
    entry = shards.write_shard(fs, build_path, shard_id, kept, stats)
    remove_staged(fs, build_path, shard_id)
    return entry


def read_staged(fs, roots: list[str], shard_id: int) -> tuple[list[dict], dict]:
    """The samples (in key order, as one staged shard holds them) and the summed fetch stats
    of a shard staged whole (one root) or in parts (one root per part)."""
    samples = []
    failures = Counter()
    n_groups = 0
    for root in roots:
        stats = shards.read_shard_stats(fs, root, shard_id)
        samples += shards.read_shard_samples(fs, root, stats["shard"], verify=True)
        failures.update(stats["failures"])
        n_groups += stats["n_groups"]
    samples.sort(key=lambda sample: sample[shards.KEY])
    return samples, {"failures": dict(failures), "n_groups": n_groups}


def part_root(build_path: str, part: int, n_parts: int) -> str:
    """Staging root of part `part` of a shard fetched in `n_parts` parts (each part a staged
    shard of its own there, holding every n_parts-th group; see build.final_round_parts)."""
    return storage.join(staging_path(build_path), PARTS_DIR, f"{part}{PART_OF}{n_parts}")


def staged_part_sets(fs, build_path: str) -> dict[int, list[str]]:
    """Shard id -> the part roots of its complete set of staged parts (one listing). A set
    counts only whole: parts of one split, every one of them published in its root."""
    folder = storage.join(staging_path(build_path), PARTS_DIR)
    if not fs.exists(folder):
        return {}
    found: dict[tuple[int, int], list[str]] = {}
    for path in fs.find(folder):
        root, _, name = path.rpartition(f"/{shards.INDEX_DIR}/")
        part_name = root.rsplit("/", 1)[-1]
        if not name.endswith(".parquet") or storage.TMP_MARK in name or PART_OF not in part_name:
            continue
        n_parts = int(part_name.split(PART_OF)[1])
        found.setdefault((int(name.split(".")[0]), n_parts), []).append(root)
    return {shard_id: sorted(roots) for (shard_id, n_parts), roots in found.items() if len(roots) == n_parts}


def remove_staged_parts(fs, build_path: str, shard_ids: set[int]) -> None:
    """Parts of these shards that an earlier run staged (of a set it did not complete, or of
    another split), before they are fetched again (one listing)."""
    folder = storage.join(staging_path(build_path), PARTS_DIR)
    if not fs.exists(folder):
        return
    for path in fs.find(folder):
        name = path.rsplit("/", 1)[-1]
        if name.split(".")[0].isdigit() and int(name.split(".")[0]) in shard_ids:
            fs.rm(path)


def remove_staged(fs, build_path: str, shard_id: int) -> None:
    """The staged copies of a shard: whole, and any parts (of any split)."""
    folder = storage.join(staging_path(build_path), PARTS_DIR)
    roots = [staging_path(build_path)]
    if fs.exists(folder):
        roots += fs.ls(folder, detail=False)
    for root in roots:
        for path in shards.shard_paths(root, shard_id):
            if fs.exists(path):
                fs.rm(path)


def promote_staged(fs, build_path: str, shard_id: int, entry: dict) -> dict:
    """Publish a shard the plan leaves unchanged (most of them) by moving its staged files:
    a rewrite would give the same bytes (the staged stats already say `duplicates_merged` 0),
    so a build writes each such shard once, not twice. The tar is checked against its
    checksum and moved first; the index, which marks the shard done, last. A run that stopped
    between the two finds the tar published already and moves the index."""
    staged_tar, staged_index = shards.shard_paths(staging_path(build_path), shard_id)
    tar, index = shards.shard_paths(build_path, shard_id)
    if fs.exists(staged_tar):
        shards.verify_shard_tar(fs, staged_tar, entry)
        storage.move(fs, staged_tar, tar)
    else:
        shards.verify_shard_tar(fs, tar, entry)
    storage.move(fs, staged_index, index)
    return entry


def remove_temporaries(fs, build_path: str) -> None:
    """Temporaries an interrupted run left in the build (never mistaken for data)."""
    parts = storage.join(staging_path(build_path), PARTS_DIR)
    part_roots = fs.ls(parts, detail=False) if fs.exists(parts) else []
    for root in (build_path, staging_path(build_path), *part_roots):
        for folder in (shards.SHARDS_DIR, shards.INDEX_DIR, PLAN_DIR):
            storage.remove_stale_temporaries(fs, storage.join(root, folder))


def remove_staging(fs, build_path: str) -> None:
    if fs.exists(staging_path(build_path)):
        fs.rm(staging_path(build_path), recursive=True)
