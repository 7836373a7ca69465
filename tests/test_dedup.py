"""Content dedup and the failure-rate abort, on plain data (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines import build, dedup, shards


def caption(text: str, kind: str = "short") -> dict:
    return {"text": text, "source": "test", "kind": kind}


def group(keys, shard_ids, captions, digests=None) -> dict:
    return {
        "key": np.array(keys, dtype=object),
        "shard": np.array(shard_ids),
        shards.DIGEST: np.array(digests or ["d"] * len(keys), dtype=object),
        "captions_json": np.array([json.dumps(c) for c in captions], dtype=object),
    }


def test_a_unique_image_plans_nothing():
    out = dedup.duplicates_in_bucket(group(["k1"], [0], [[caption("a")]]))
    assert len(out["plan"]) == 0
    assert len(dedup.duplicates_in_bucket(group([], [], []))["plan"]) == 0


def test_duplicates_merge_into_the_smallest_key_with_every_caption_once():
    out = dedup.duplicates_in_bucket(
        group(
            ["k3", "k1", "k2"],
            [2, 0, 1],
            [[caption("c"), caption("shared")], [caption("a")], [caption("shared"), caption("b", "long")]],
        )
    )
    (plan,) = [json.loads(p) for p in out["plan"]]
    assert plan["keep"] == ["k1", 0]
    assert plan["drop"] == [["k2", 1], ["k3", 2]]
    assert [c["text"] for c in plan["captions"]] == ["a", "shared", "b", "c"]
    assert plan["captions"][2]["kind"] == "long"


def test_a_bucket_plans_one_merge_per_shared_digest():
    """Against a naive reference: group the rows by digest in a dict."""
    rng = np.random.default_rng(0)
    digests = [f"{d:064x}" for d in rng.integers(0, 40, 120)]
    keys = [f"k{i:03d}" for i in rng.permutation(120)]
    batch = group(keys, list(rng.integers(0, 5, 120)), [[caption(k)] for k in keys], digests)
    by_digest = {}
    for key, shard, digest in zip(keys, batch["shard"], digests):
        by_digest.setdefault(digest, []).append((key, int(shard)))
    expected = sorted(
        ([min(m)[0], min(m)[1]], sorted([list(x) for x in m])[1:]) for m in by_digest.values() if len(m) > 1
    )
    plans = [json.loads(p) for p in dedup.duplicates_in_bucket(batch)["plan"]]
    assert sorted((p["keep"], p["drop"]) for p in plans) == expected
    assert all([c["text"] for c in p["captions"]] == [p["keep"][0]] + [k for k, _ in p["drop"]] for p in plans)


def sample(key: str, texts: list[str]) -> dict:
    meta = {"key": key, "source": f"http://x/{key}", "captions": [caption(t) for t in texts]}
    return {shards.KEY: key, shards.IMAGE: b"jpg", shards.EDGE: b"png", shards.META: json.dumps(meta)}


def test_edits_drop_merged_samples_and_replace_caption_groups():
    plans = [{"keep": ["k1", 0], "drop": [["k2", 1], ["k3", 0]], "captions": [caption("a"), caption("b")]}]
    edits = dedup.shard_edits(plans, [0, 1])
    assert edits[0]["drop"] == ["k3"] and edits[1]["drop"] == ["k2"]
    kept = dedup.apply_edits([sample("k1", ["a"]), sample("k3", ["b"]), sample("k4", ["z"])], edits[0])
    assert [s[shards.KEY] for s in kept] == ["k1", "k4"]
    assert [c["text"] for c in json.loads(kept[0][shards.META])["captions"]] == ["a", "b"]
    assert dedup.apply_edits([sample("k2", ["b"])], edits[1]) == []


def stats(n_groups: int, failures: dict) -> dict:
    return {"n_groups": n_groups, "failures": failures}


def test_image_failure_rate_aborts_once_enough_images_were_tried():
    bad = [stats(100, {"http_404": 95})]
    build.check_image_failures(bad, remaining=3, max_rate=0.9)  # 100 tried: too few to judge
    with pytest.raises(build.BuildAborted, match="95 of 200 images failed"):
        build.check_image_failures(bad + [stats(100, {"timeout": 0})], remaining=3, max_rate=0.4)
    build.check_image_failures(bad + [stats(100, {})], remaining=0, max_rate=0.5)  # 47.5%
    with pytest.raises(build.BuildAborted):
        build.check_image_failures([stats(10, {"http_404": 9})], remaining=0, max_rate=0.5)


def test_row_failure_rate_ignores_the_header():
    from collections import Counter

    build.check_row_failures(Counter({"": 5, "header": 1, "bad_url": 5}), max_rate=0.5)
    with pytest.raises(build.BuildAborted, match="6 of 11 input rows"):
        build.check_row_failures(Counter({"": 5, "header": 1, "bad_url": 6}), max_rate=0.5)


def test_publishing_a_shard_again_finds_it_published(tmp_path):
    """A publish task retried after its node died (the shard published, the staged copy maybe
    removed) returns the published entry instead of failing on the missing staged copy."""
    from pipelines import storage

    fs, root = storage.open_storage(str(tmp_path))
    meta = {"key": "k1", "source": "s1", "width": 4, "height": 4, "captions": [caption("a red dog")]}
    sample = {shards.KEY: "k1", shards.IMAGE: b"jpeg", shards.EDGE: b"png", shards.META: json.dumps(meta)}
    shards.write_shard(fs, dedup.staging_path(root), 0, [sample], {"failures": {}, "n_groups": 1})
    dedup.write_plan(fs, root, [], [0])
    first = dedup.publish_shard(fs, root, 0)
    assert not fs.exists(dedup.staged_index_path(root, 0))
    assert dedup.publish_shard(fs, root, 0) == first  # the retry


def staged_shard(fs, root: str, shard_id: int, keys: list[str]) -> dict:
    """A shard staged as ShardBuilder stages it (duplicates_merged 0); returns its entry."""
    rows = [sized_sample(k, f"caption of {k}", f"image {k}".encode()) for k in keys]
    return shards.write_shard(
        fs,
        dedup.staging_path(root),
        shard_id,
        rows,
        {
            "failures": {"http_404": 1},
            "n_groups": len(keys) + 1,
            "duplicates_merged": 0,
            "n_captions_written": len(keys),
        },
    )


def test_an_unchanged_shard_is_published_as_a_rewrite_would_publish_it(tmp_path):
    """The plan leaves shard 1 alone and edits shard 0: shard 1's staged files are moved, not
    rewritten, and what is published (tar bytes, index rows and stats) equals what rewriting
    it through the edit path gives."""
    from pipelines import storage

    fs, root = storage.open_storage(str(tmp_path / "moved"))
    staged_shard(fs, root, 0, ["a1", "a2"])
    staged_shard(fs, root, 1, ["b1", "b2", "b3"])
    staged_tar = storage.read_bytes(fs, shards.shard_paths(dedup.staging_path(root), 1)[0])
    dedup.write_plan(fs, root, [{"keep": ["a1", 0], "drop": [["a2", 0]], "captions": [caption("x")]}], [0, 1])
    published = [dedup.publish_shard(fs, root, i) for i in (0, 1)]
    assert published[0]["n_samples"] == 1 and published[1]["n_samples"] == 3
    assert all(f"/{dedup.PLAN_DIR}/" in path for path in fs.find(dedup.staging_path(root)))
    tar, index = shards.shard_paths(root, 1)
    assert storage.read_bytes(fs, tar) == staged_tar

    # The reference: the same shard rewritten (an empty edit through apply_edits).
    ref_fs, ref_root = storage.open_storage(str(tmp_path / "rewritten"))
    staged_shard(ref_fs, ref_root, 1, ["b1", "b2", "b3"])
    samples = shards.read_shard_samples(ref_fs, dedup.staging_path(ref_root), published[1], verify=True)
    stats = {"failures": {"http_404": 1}, "n_groups": 4, "duplicates_merged": 0, "n_captions_written": 3}
    assert (
        shards.write_shard(ref_fs, ref_root, 1, dedup.apply_edits(samples, {"drop": [], "captions": {}}), stats)
        == published[1]
    )
    ref_tar, ref_index = shards.shard_paths(ref_root, 1)
    assert storage.read_bytes(ref_fs, ref_tar) == storage.read_bytes(fs, tar)
    assert pq.read_table(ref_index).equals(pq.read_table(index))
    assert shards.read_shard_stats(fs, root, 1) == shards.read_shard_stats(ref_fs, ref_root, 1)


def test_a_shard_staged_in_parts_publishes_what_a_whole_fetch_publishes(tmp_path):
    """Shard 0 staged whole in one build and as three parts (every third group, the
    failures in one) in another: the same tar bytes, index and stats; the parts count as
    staged only once all three are there, and go when the shard is published."""
    from pipelines import storage

    keys = ["k1", "k2", "k3", "k4", "k5"]
    whole_fs, whole = storage.open_storage(str(tmp_path / "whole"))
    staged_shard(whole_fs, whole, 0, keys)  # its stats: one http_404 among len(keys) + 1 groups
    fs, root = storage.open_storage(str(tmp_path / "parts"))
    for part in range(3):
        assert dedup.staged_part_sets(fs, root) == {}
        part_keys, failures = keys[part::3], 1 if part == 1 else 0
        rows = [sized_sample(k, f"caption of {k}", f"image {k}".encode()) for k in part_keys]
        shards.write_shard(
            fs,
            dedup.part_root(root, part, 3),
            0,
            rows,
            {
                "failures": {"http_404": 1} if failures else {},
                "duplicates_merged": 0,
                "n_groups": len(part_keys) + failures,
                "n_captions_written": len(part_keys),
            },
        )
    assert list(dedup.staged_part_sets(fs, root)) == [0]
    for f, r in ((whole_fs, whole), (fs, root)):
        dedup.write_plan(f, r, [], [0])
    assert dedup.publish_shard(fs, root, 0) == dedup.publish_shard(whole_fs, whole, 0)
    tar, index = shards.shard_paths(root, 0)
    whole_tar, whole_index = shards.shard_paths(whole, 0)
    assert storage.read_bytes(fs, tar) == storage.read_bytes(whole_fs, whole_tar)
    assert pq.read_table(index).equals(pq.read_table(whole_index))
    assert shards.read_shard_stats(fs, root, 0) == shards.read_shard_stats(whole_fs, whole, 0)
    assert dedup.staged_part_sets(fs, root) == {}
    assert [p for p in fs.find(dedup.staging_path(root)) if f"/{dedup.PLAN_DIR}/" not in p] == []


def test_stale_parts_of_a_shard_are_removed_before_it_is_fetched_again(tmp_path):
    from pipelines import storage

    fs, root = storage.open_storage(str(tmp_path))
    for shard_id in (0, 1):
        shards.write_shard(fs, dedup.part_root(root, 0, 2), shard_id, [], {"failures": {}, "n_groups": 0})
    dedup.remove_staged_parts(fs, root, {1})
    assert fs.exists(shards.shard_paths(dedup.part_root(root, 0, 2), 0)[1])
    assert not fs.exists(shards.shard_paths(dedup.part_root(root, 0, 2), 1)[0])


def test_promoting_a_shard_resumes_after_its_tar_moved_and_refuses_a_corrupt_one(tmp_path):
    from pipelines import storage

    fs, root = storage.open_storage(str(tmp_path))
    entry = staged_shard(fs, root, 0, ["k1", "k2"])
    dedup.write_plan(fs, root, [], [0])
    staged_tar, staged_index = shards.shard_paths(dedup.staging_path(root), 0)
    tar, index = shards.shard_paths(root, 0)
    storage.move(fs, staged_tar, tar)  # a run stopped here: tar moved, shard not yet done
    assert shards.read_shard_stats(fs, root, 0) is None
    assert dedup.publish_shard(fs, root, 0) == entry
    assert fs.exists(index) and not fs.exists(staged_index)

    entry = staged_shard(fs, root, 1, ["k3"])
    dedup.write_plan(fs, root, [], [0, 1])
    staged_tar = shards.shard_paths(dedup.staging_path(root), 1)[0]
    data = bytearray(storage.read_bytes(fs, staged_tar))
    data[600] ^= 0xFF
    storage.write_bytes_atomic(fs, staged_tar, bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        dedup.publish_shard(fs, root, 1)
    assert shards.read_shard_stats(fs, root, 1) is None and fs.exists(staged_tar)


def sized_sample(key: str, text: str, image: bytes) -> dict:
    meta = {"key": key, "source": f"http://x/{key}", "width": 4, "height": 4, "captions": [caption(text)]}
    return {shards.KEY: key, shards.IMAGE: image, shards.EDGE: b"png", shards.META: json.dumps(meta)}


@pytest.mark.ray
def test_one_task_and_the_shuffle_find_the_same_duplicates(ray_session, tmp_path):
    """A small build's duplicates are found by one task reading every index; a large one's by
    the digest shuffle. Both against a dict of digest -> (key, shard), over staged shards whose
    images repeat within and across shards."""
    import hashlib

    from pipelines import storage

    fs, root = storage.open_storage(str(tmp_path))
    rng = np.random.default_rng(1)
    by_digest = {}
    for shard_id in range(4):
        picks = rng.integers(0, 15, 10)
        rows = [
            sized_sample(f"s{shard_id}k{i}", f"caption {shard_id}-{i}", f"image {p}".encode())
            for i, p in enumerate(picks)
        ]
        for row in rows:
            digest = hashlib.sha256(row[shards.IMAGE]).hexdigest()
            by_digest.setdefault(digest, []).append((row[shards.KEY], shard_id))
        shards.write_shard(fs, dedup.staging_path(root), shard_id, rows, {"failures": {}, "n_groups": 10})
    expected = sorted(
        ([min(m)[0], min(m)[1]], sorted([list(x) for x in m])[1:]) for m in by_digest.values() if len(m) > 1
    )
    found = {}
    for name, max_rows in (("one task", 40), ("shuffle", build.ROWS_PER_BUCKET + 1)):
        plans = build.find_duplicates(fs, root, list(range(4)), max_rows)
        found[name] = sorted((p["keep"], p["drop"], [c["text"] for c in p["captions"]]) for p in plans)
        assert sorted((keep, drop) for keep, drop, _ in found[name]) == expected
    assert found["one task"] == found["shuffle"]
