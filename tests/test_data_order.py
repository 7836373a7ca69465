"""Deterministic data order: per-epoch shard permutation, a partition of the shards over
workers, equal steps per worker, and the resume property on real shards: the plan that
skips k samples yields exactly the full epoch's samples minus its first k."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import shards, storage
from training.batches import EPOCH
from training.data_order import (
    ITEM_BUILD,
    ITEM_EPOCH,
    ITEM_SHARD,
    ITEM_SKIP,
    ITEM_VERIFY,
    Source,
    compute_epoch_steps,
    compute_total_steps,
    iter_item_samples,
    locate_step,
    order_shards,
    plan_worker_epoch,
    plan_worker_run,
    single_source,
    worker_shards,
)


def make_entries(sizes: list[int]) -> list[Source]:
    """One build of shards of these sizes, as the order functions see it (only id and
    n_samples of its manifest entries matter)."""
    return single_source([{"id": i, "n_samples": n, "tar": f"shards/{i:06d}.tar"} for i, n in enumerate(sizes)])


def ids(reads) -> list[int]:
    return [r.entry["id"] for r in reads]


def n_samples(reads) -> int:
    return sum(r.entry["n_samples"] for r in reads)


# ---------------------------------------------------------------- shard order


def test_order_shards_deterministic_per_seed_and_epoch():
    entries = make_entries([5] * 20)
    first = ids(order_shards(entries, seed=3, epoch=0))
    assert first == ids(order_shards(entries, seed=3, epoch=0))
    assert sorted(first) == list(range(20))  # a permutation
    assert first != ids(order_shards(entries, seed=3, epoch=1))
    assert first != ids(order_shards(entries, seed=4, epoch=0))
    assert first != list(range(20))


@settings(max_examples=40, deadline=None)
@given(num_shards=st.integers(0, 30), world=st.integers(1, 6), seed=st.integers(0, 1000), epoch=st.integers(0, 5))
def test_worker_shards_partition_the_shards(num_shards, world, seed, epoch):
    entries = make_entries([1] * num_shards)
    per_worker = [ids(worker_shards(entries, seed, epoch, rank, world)) for rank in range(world)]
    flat = [i for worker in per_worker for i in worker]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(num_shards))  # union = all
    assert max(map(len, per_worker)) - min(map(len, per_worker)) <= 1  # round robin


# ---------------------------------------------------------------- steps


def test_epoch_steps_by_hand():
    # One worker: all samples. 5 + 7 + 9 = 21 -> 21 // 4 = 5 steps.
    assert compute_epoch_steps(make_entries([5, 7, 9]), 0, 0, world=1, batch_size=4) == 5
    # Two workers, one shard each: the smaller worker (3 samples) bounds both: 3 // 2 = 1.
    assert compute_epoch_steps(make_entries([100, 3]), 0, 0, world=2, batch_size=2) == 1
    # Three equal workers of 2 x 10 samples: 20 // 6 = 3.
    assert compute_epoch_steps(make_entries([10] * 6), 0, 0, world=3, batch_size=6) == 3
    # More workers than shards: an empty worker means no full step for anyone.
    assert compute_epoch_steps(make_entries([10]), 0, 0, world=2, batch_size=1) == 0


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12),
    world=st.integers(1, 4),
    batch=st.integers(1, 8),
    seed=st.integers(0, 100),
    epoch=st.integers(0, 3),
)
def test_epoch_steps_is_min_over_workers(sizes, world, batch, seed, epoch):
    entries = make_entries(sizes)
    totals = [n_samples(worker_shards(entries, seed, epoch, r, world)) for r in range(world)]
    assert compute_epoch_steps(entries, seed, epoch, world, batch) == min(totals) // batch


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=8),
    world=st.integers(1, 3),
    batch=st.integers(1, 5),
    epochs=st.integers(1, 4),
    seed=st.integers(0, 100),
)
def test_locate_step_and_total_steps_agree(sizes, world, batch, epochs, seed):
    entries = make_entries(sizes)
    per_epoch = [compute_epoch_steps(entries, seed, e, world, batch) for e in range(epochs)]
    total = compute_total_steps(entries, seed, world, batch, epochs)
    assert total == sum(per_epoch)
    expected = [(e, s) for e, n in enumerate(per_epoch) for s in range(n)]
    assert [locate_step(entries, seed, world, batch, g, epochs) for g in range(total)] == expected
    assert locate_step(entries, seed, world, batch, total, epochs) == (epochs, 0)


# ---------------------------------------------------------------- plans


def plan_summary(items: list[dict]) -> list[tuple[int, int, int]]:
    return [(json.loads(i[ITEM_SHARD])["id"], i[ITEM_SKIP], i[ITEM_EPOCH]) for i in items]


def test_plan_skips_whole_shards_then_inside_the_partial_one():
    entries = make_entries([4, 6, 3, 5, 2])
    order = worker_shards(entries, seed=1, epoch=2, rank=0, world=1)
    a, b, c = (r.entry["n_samples"] for r in order[:3])
    shard_ids = ids(order)
    full = plan_worker_epoch(entries, 1, 2, 0, 1, skip_samples=0)
    assert plan_summary(full) == [(i, 0, 2) for i in shard_ids]
    # Skip the first shard whole and 2 samples of the second.
    assert plan_summary(plan_worker_epoch(entries, 1, 2, 0, 1, skip_samples=a + 2)) == [(shard_ids[1], 2, 2)] + [
        (i, 0, 2) for i in shard_ids[2:]
    ]
    # Exactly two shards: the third starts at its beginning.
    assert plan_summary(plan_worker_epoch(entries, 1, 2, 0, 1, skip_samples=a + b)) == [
        (i, 0, 2) for i in shard_ids[2:]
    ]
    assert plan_summary(plan_worker_epoch(entries, 1, 2, 0, 1, skip_samples=a + b + c - 1)) == [
        (shard_ids[2], c - 1, 2)
    ] + [(i, 0, 2) for i in shard_ids[3:]]
    assert plan_worker_epoch(entries, 1, 2, 0, 1, skip_samples=entries[0].n_samples) == []
    # The item's shard field is the whole manifest entry.
    assert json.loads(full[0][ITEM_SHARD]) == order[0].entry


def test_plan_covers_only_this_workers_shards():
    entries = make_entries([3] * 7)
    for rank in range(3):
        planned = [s for s, _, _ in plan_summary(plan_worker_epoch(entries, 0, 1, rank, 3, 0))]
        assert planned == ids(worker_shards(entries, 0, 1, rank, 3))


# ---------------------------------------------------------------- real shards


SHARD_SIZES = (4, 5, 3)


def make_sample(shard_id: int, index: int) -> dict:
    key = hashlib.sha256(f"{shard_id}-{index}".encode()).hexdigest()[:16]
    meta = {
        "source": "synthetic",
        "width": 8,
        "height": 8,
        "captions": [{"kind": shards.CAPTION_SHORT, "text": f"sample {shard_id}/{index}"}],
    }
    return {
        shards.KEY: key,
        shards.IMAGE: f"jpg-{key}".encode(),
        shards.EDGE: f"png-{key}".encode(),
        shards.META: json.dumps(meta),
    }


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """(build uri, its sources) of three small shards written by the real writer."""
    uri = str(tmp_path_factory.mktemp("build"))
    fs, path = storage.open_storage(uri)
    entries = [
        shards.write_shard(fs, path, shard_id, [make_sample(shard_id, i) for i in range(n)])
        for shard_id, n in enumerate(SHARD_SIZES)
    ]
    return uri, single_source(entries, uri)


def read_plan(items: list[dict], uri: str, seed: int) -> list[dict]:
    assert all(item[ITEM_BUILD] for item in items)
    return [row for item in items for row in iter_item_samples(item, seed)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("epoch", [0, 1])
def test_resume_plan_continues_the_full_epoch(build, world, epoch):
    uri, entries = build
    seed = 11
    for rank in range(world):
        full = read_plan(plan_worker_epoch(entries, seed, epoch, rank, world, 0), uri, seed)
        worker_total = n_samples(worker_shards(entries, seed, epoch, rank, world))
        assert len(full) == worker_total
        assert all(row[EPOCH] == epoch for row in full)
        for skip in range(worker_total + 1):
            resumed = read_plan(plan_worker_epoch(entries, seed, epoch, rank, world, skip), uri, seed)
            assert [r[shards.KEY] for r in resumed] == [r[shards.KEY] for r in full[skip:]], (rank, skip)
            assert resumed == full[skip:]


def test_epoch_reads_every_sample_once_with_intact_rows(build):
    uri, entries = build
    rows = read_plan(plan_worker_epoch(entries, 0, 0, 0, 1, 0), uri, 0)
    written = {s[shards.KEY]: s for i, n in enumerate(SHARD_SIZES) for s in (make_sample(i, j) for j in range(n))}
    assert sorted(r[shards.KEY] for r in rows) == sorted(written)
    for row in rows:
        assert {k: row[k] for k in shards.SAMPLE_COLUMNS} == written[row[shards.KEY]]


def test_within_shard_order_is_a_per_epoch_permutation(build):
    uri, entries = build
    item = {ITEM_SHARD: json.dumps(entries[0].entries[1]), ITEM_SKIP: 0, ITEM_BUILD: uri}
    orders = {epoch: [r[shards.KEY] for r in iter_item_samples({**item, ITEM_EPOCH: epoch}, 5)] for epoch in range(4)}
    stored = sorted(make_sample(1, j)[shards.KEY] for j in range(SHARD_SIZES[1]))
    assert all(sorted(order) == stored for order in orders.values())
    assert orders[0] == [r[shards.KEY] for r in iter_item_samples({**item, ITEM_EPOCH: 0}, 5)]
    assert len({tuple(order) for order in orders.values()}) > 1  # reshuffled across epochs


@pytest.mark.parametrize("world, batch", [(1, 4), (2, 3)])
def test_run_plan_batches_into_exactly_the_runs_steps_and_resumes(build, world, batch):
    """One stream for all epochs: each epoch contributes its whole batches only, and the
    stream from step k is the full stream without its first k batches."""
    uri, entries = build
    seed, epochs = 3, 3
    total = compute_total_steps(entries, seed, world, batch, epochs)
    for rank in range(world):
        full = read_plan(plan_worker_run(entries, seed, rank, world, batch, 0, epochs), uri, seed)
        assert len(full) == total * batch
        per_epoch = [compute_epoch_steps(entries, seed, e, world, batch) * batch for e in range(epochs)]
        assert [sum(r[EPOCH] == e for r in full) for e in range(epochs)] == per_epoch
        for step in range(total + 1):
            resumed = read_plan(plan_worker_run(entries, seed, rank, world, batch, step, epochs), uri, seed)
            assert resumed == full[step * batch :], (rank, step)


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12),
    world=st.integers(1, 4),
    batch=st.integers(1, 5),
    epochs=st.integers(1, 3),
    start=st.integers(0, 20),
)
def test_each_shard_is_verified_once_per_run_at_its_first_read(sizes, world, batch, epochs, start):
    """Exactly one item over all workers verifies each shard the run reads, and it is that
    shard's earliest read (an epoch's reads run in parallel across workers)."""
    entries = make_entries(sizes)
    start = min(start, compute_total_steps(entries, 0, world, batch, epochs))
    items = [i for r in range(world) for i in plan_worker_run(entries, 0, r, world, batch, start, epochs)]
    first_epoch = {}
    for item in items:
        shard = json.loads(item[ITEM_SHARD])["id"]
        first_epoch[shard] = min(first_epoch.get(shard, item[ITEM_EPOCH]), item[ITEM_EPOCH])
    verifying = [(json.loads(i[ITEM_SHARD])["id"], i[ITEM_EPOCH]) for i in items if i[ITEM_VERIFY]]
    assert sorted(verifying) == sorted(first_epoch.items())


def test_a_corrupt_shard_is_named_at_its_first_read(tmp_path):
    fs, path = storage.open_storage(str(tmp_path))
    written = [shards.write_shard(fs, path, i, [make_sample(i, j) for j in range(3)]) for i in range(2)]
    entries = single_source(written, str(tmp_path))
    tar = storage.join(path, written[0]["tar"])
    data = storage.read_bytes(fs, tar)
    at = data.index(b"jpg-") + 5
    # one changed byte inside an image: the tar still parses, only the checksum can tell
    storage.write_bytes_atomic(fs, tar, data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])
    (item,) = [i for i in plan_worker_run(entries, 0, 0, 1, 1, 0, 1) if json.loads(i[ITEM_SHARD])["id"] == 0]
    with pytest.raises(ValueError, match=f"checksum mismatch for {written[0]['tar']}"):
        list(iter_item_samples(item, 0))
    assert len(list(iter_item_samples({**item, ITEM_VERIFY: False}, 0))) == 3
