"""Mixtures of builds: `--data URI:WEIGHT ...` parsed and checked, each source's share of an
epoch's samples following its weight without drift, each source's shards read as a stream of
full permutations (a light source is not repeated before all its shards were read), the
single-build order unchanged, and exact resume and once-per-run verification on real shards
of two builds."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import shards, storage
from tests.test_data_order import make_sample
from training import data_mixture
from training.data_order import (
    ITEM_SHARD,
    ITEM_SOURCE,
    ITEM_VERIFY,
    Source,
    compute_epoch_steps,
    compute_total_steps,
    cycle_permutation,
    iter_item_samples,
    order_shards,
    plan_worker_run,
    within_shard_order,
)


def mixture(sizes_by_source: list[list[int]], weights: list[float]) -> list[Source]:
    total = sum(weights)
    return [
        Source(f"mem://b{b}", w / total, [{"id": i, "n_samples": n} for i, n in enumerate(sizes)], f"d{b}")
        for b, (sizes, w) in enumerate(zip(sizes_by_source, weights))
    ]


# ---------------------------------------------------------------- --data


def test_build_specs_parse_with_optional_weights():
    assert data_mixture.parse_build_spec("s3://b/shards/cc12m/ID:0.7") == ("s3://b/shards/cc12m/ID", 0.7)
    assert data_mixture.parse_build_spec("s3://b/shards/cc12m/ID") == ("s3://b/shards/cc12m/ID", 1.0)
    assert data_mixture.parse_build_spec("/data/x:3") == ("/data/x", 3.0)
    assert data_mixture.parse_build_spec("s3://host:9000/x:2e-1") == ("s3://host:9000/x", 0.2)
    assert data_mixture.parse_build_spec("/data/odd:name") == ("/data/odd:name", 1.0)  # not a number
    for bad in ("/data/x:0", "/data/x:-1", ":0.5", ""):
        with pytest.raises(ValueError, match="positive weight"):
            data_mixture.parse_build_spec(bad)
    assert data_mixture.parse_builds(["a:3", "b:1"]) == [("a", 0.75), ("b", 0.25)]
    assert data_mixture.parse_builds(["a"]) == [("a", 1.0)]
    with pytest.raises(ValueError, match="names a build twice"):
        data_mixture.parse_builds(["a:1", "a:2"])


def write_build(root, name: str, sizes, first_id: int = 0) -> str:
    """A build of real shards (samples distinct across builds by `first_id`) and its manifest."""
    uri = str(root / name)
    fs, path = storage.open_storage(uri)
    entries = [
        shards.write_shard(fs, path, i, [make_sample(first_id + i, j) for j in range(n)]) for i, n in enumerate(sizes)
    ]
    shards.write_manifest(fs, path, {"shards": entries, "name": name})
    return uri


def test_load_sources_reads_each_manifest_and_refuses_one_build_twice(tmp_path):
    a, b = write_build(tmp_path, "a", [3, 4]), write_build(tmp_path, "b", [5], first_id=100)
    sources = data_mixture.load_sources([f"{a}:0.7", f"{b}:0.3"])
    assert [(s.uri, s.weight, s.n_samples) for s in sources] == [(a, 0.7, 7), (b, 0.3, 5)]
    recorded = data_mixture.describe_sources(sources)
    assert recorded["manifest_digests"] == [shards.manifest_digest(shards.read_manifest(u)) for u in (a, b)]
    assert recorded["data_weights"] == [0.7, 0.3] and recorded["data_uris"] == [a, b]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / shards.MANIFEST).write_bytes((tmp_path / "a" / shards.MANIFEST).read_bytes())
    with pytest.raises(ValueError, match="same build"):
        data_mixture.load_sources([a, str(tmp_path / "copy")])


# ---------------------------------------------------------------- order


def test_one_build_keeps_the_order_of_runs_started_before_mixtures():
    """Epoch e is the permutation rng([seed, e, 0]) and a shard's samples rng([seed, e, id+1]):
    what data_order computed before mixtures, so those runs resume exactly."""
    sources = mixture([[4, 6, 3, 5, 2, 7]], [1.0])
    for seed, epoch in ((0, 0), (3, 2)):
        expected = np.random.default_rng([seed, epoch, 0]).permutation(6)
        assert [r.entry["id"] for r in order_shards(sources, seed, epoch)] == list(expected)
        assert {r.cycle for r in order_shards(sources, seed, epoch)} == {epoch}
    item = {"epoch": 2, "source": 0, "cycle": 2}
    assert list(within_shard_order(9, 5, item, 4)) == list(np.random.default_rng([5, 2, 5]).permutation(9))


def epoch_reads_by_source(sources, seed, epochs):
    return [
        [[r for r in order_shards(sources, seed, e) if r.source == b] for e in range(epochs)]
        for b in range(len(sources))
    ]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=2, max_size=3),
    raw=st.lists(st.floats(0.05, 1.0), min_size=3, max_size=3),
    epochs=st.integers(1, 6),
    seed=st.integers(0, 100),
)
def test_each_source_takes_its_weights_share_as_a_stream_of_full_permutations(sizes, raw, epochs, seed):
    sources = mixture(sizes, raw[: len(sizes)])
    total = sum(s.n_samples for s in sources)
    for src, per_epoch in zip(sources, epoch_reads_by_source(sources, seed, epochs)):
        biggest = max(e["n_samples"] for e in src.entries)
        # the share: cumulative samples within one shard of round(E·w·N) after every epoch E
        done = np.cumsum([sum(r.entry["n_samples"] for r in reads) for reads in per_epoch])
        targets = [round((e + 1) * src.weight * total) for e in range(epochs)]
        assert all(t <= d < t + biggest for d, t in zip(done, targets)), (done, targets)
        # the stream: consecutive full cycles, each a permutation of all the source's shards
        stream = [(r.cycle, r.entry["id"]) for reads in per_epoch for r in reads]
        assert len(stream) == len(set(stream))  # no shard twice in one cycle
        counts = Counter(c for c, _ in stream)
        assert sorted(counts) == list(range(len(counts)))
        assert all(counts[c] == len(src.entries) for c in sorted(counts)[:-1])


def test_a_light_source_is_not_repeated_before_all_its_shards_were_read():
    sources = mixture([[10] * 20, [10] * 30], [0.9, 0.1])  # N = 500: 50 samples of b1 per epoch
    light = [r for reads in epoch_reads_by_source(sources, 0, 6)[1] for r in reads]
    assert len(light) == 30 and {r.cycle for r in light} == {0}
    assert sorted(r.entry["id"] for r in light) == list(range(30))
    heavy = [r for reads in epoch_reads_by_source(sources, 0, 1)[0] for r in reads]
    assert len(heavy) == 45 and Counter(r.cycle for r in heavy) == {0: 20, 1: 20, 2: 5}
    order = cycle_permutation(20, 0, 0, 2)
    assert {r.entry["id"] for r in heavy if r.cycle == 2} == set(order[:5].tolist())


def test_the_epoch_mixes_the_sources_shards():
    sources = mixture([[5] * 40, [5] * 40], [0.5, 0.5])
    order = [r.source for r in order_shards(sources, 7, 0)]
    assert Counter(order) == {0: 40, 1: 40}
    assert order != sorted(order) and set(order[:20]) == {0, 1}


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=6), min_size=2, max_size=2),
    world=st.integers(1, 3),
    batch=st.integers(1, 4),
    epochs=st.integers(1, 3),
    start=st.integers(0, 20),
)
def test_each_shard_of_each_source_is_verified_once_per_run(sizes, world, batch, epochs, start):
    sources = mixture(sizes, [0.6, 0.4])
    start = min(start, compute_total_steps(sources, 0, world, batch, epochs))
    items = [i for r in range(world) for i in plan_worker_run(sources, 0, r, world, batch, start, epochs)]
    read = {(i[ITEM_SOURCE], json.loads(i[ITEM_SHARD])["id"]) for i in items}
    verifying = [(i[ITEM_SOURCE], json.loads(i[ITEM_SHARD])["id"]) for i in items if i[ITEM_VERIFY]]
    assert sorted(verifying) == sorted(read)


# ---------------------------------------------------------------- real shards of two builds


@pytest.fixture(scope="module")
def two_builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    return write_build(root, "a", [4, 5, 3]), write_build(root, "b", [6, 2], first_id=100)


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 3)])
def test_a_mixture_reads_both_builds_and_resumes_exactly(two_builds, world, batch):
    a, b = two_builds
    sources = data_mixture.load_sources([f"{a}:0.25", f"{b}:0.75"])
    seed, epochs = 3, 3
    total = compute_total_steps(sources, seed, world, batch, epochs)
    assert total == sum(compute_epoch_steps(sources, seed, e, world, batch) for e in range(epochs))
    for rank in range(world):
        items = plan_worker_run(sources, seed, rank, world, batch, 0, epochs)
        full = [row for item in items for row in iter_item_samples(item, seed)]
        assert len(full) == total * batch
        assert {item["build"] for item in items} == {a, b}
        for step in range(total + 1):
            resumed = [
                row
                for item in plan_worker_run(sources, seed, rank, world, batch, step, epochs)
                for row in iter_item_samples(item, seed)
            ]
            assert resumed == full[step * batch :], (rank, step)


def test_samples_come_from_each_build_in_proportion(two_builds):
    """Over 8 epochs on one worker, build b (weight 0.75) gives 3 samples of every 4, whole shards."""
    a, b = two_builds
    sources = data_mixture.load_sources([f"{a}:0.25", f"{b}:0.75"])
    items = plan_worker_run(sources, 0, 0, 1, 1, 0, 8)
    rows = [row for item in items for row in iter_item_samples(item, 0)]
    from_b = sum(json.loads(r[shards.META])["captions"][0]["text"].split()[1].startswith("10") for r in rows)
    assert sum(s.n_samples for s in sources) * 8 == 160  # 40 of a, 120 of b, each within one shard above
    assert 120 <= from_b < 120 + 6 and 40 <= len(rows) - from_b < 40 + 5
