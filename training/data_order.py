"""Deterministic data order over shards: which shards each worker reads in an epoch, in
which order, and where a resumed run picks up, all as functions of (seed, epoch, step).

Shard order is a per-epoch permutation; worker r reads shards r, r+W, ...; samples inside
a shard are permuted per (seed, epoch, shard). Every worker takes the same number of steps
per epoch (the smallest worker's sample count // batch size), so steps line up.
"""
from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np

from pipelines import shards, storage
from training.batches import EPOCH

ITEM_SHARD, ITEM_SKIP, ITEM_TAKE, ITEM_EPOCH = "shard", "skip", "take", "epoch"
ITEM_VERIFY = "verify"  # this read is the shard's first of the run: check its sha256


def order_shards(entries: list[dict], seed: int, epoch: int) -> list[dict]:
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(entries))
    return [entries[i] for i in order]


def worker_shards(entries: list[dict], seed: int, epoch: int, rank: int, world: int) -> list[dict]:
    return order_shards(entries, seed, epoch)[rank::world]


def compute_epoch_steps(entries: list[dict], seed: int, epoch: int, world: int, batch_size: int) -> int:
    totals = [sum(e["n_samples"] for e in worker_shards(entries, seed, epoch, r, world))
              for r in range(world)]
    return min(totals) // batch_size


def locate_step(entries, seed: int, world: int, batch_size: int, step: int,
                epochs: int) -> tuple[int, int]:
    """(epoch, step within epoch) of a global step."""
    for epoch in range(epochs):
        n = compute_epoch_steps(entries, seed, epoch, world, batch_size)
        if step < n:
            return epoch, step
        step -= n
    return epochs, 0


def compute_total_steps(entries, seed: int, world: int, batch_size: int, epochs: int) -> int:
    return sum(compute_epoch_steps(entries, seed, e, world, batch_size) for e in range(epochs))


def plan_worker_epoch(entries, seed: int, epoch: int, rank: int, world: int,
                      skip_samples: int, take_samples: int | None = None) -> list[dict]:
    """Reader items for one worker and epoch; the first `skip_samples` samples (already
    trained on before a resume) are skipped, whole shards without being read, and at most
    `take_samples` samples follow (the epoch's whole batches; None = all)."""
    items, remaining = [], float("inf") if take_samples is None else take_samples
    for entry in worker_shards(entries, seed, epoch, rank, world):
        if skip_samples >= entry["n_samples"]:
            skip_samples -= entry["n_samples"]
            continue
        if remaining <= 0:
            break
        take = int(min(entry["n_samples"] - skip_samples, remaining))
        items.append({ITEM_SHARD: json.dumps(entry), ITEM_SKIP: skip_samples, ITEM_TAKE: take,
                      ITEM_EPOCH: epoch})
        remaining, skip_samples = remaining - take, 0
    return items


def plan_worker_run(entries, seed: int, rank: int, world: int, batch_size: int,
                    start_step: int, epochs: int) -> list[dict]:
    """Reader items for all of one worker's remaining steps: every epoch trimmed to its
    whole batches, so one stream of samples batches into exactly the run's steps. The
    item of each shard's first read in the run (by any worker) carries ITEM_VERIFY."""
    return plan_all_workers(entries, seed, world, batch_size, start_step, epochs)[rank]


def plan_all_workers(entries, seed: int, world: int, batch_size: int, start_step: int,
                     epochs: int) -> list[list[dict]]:
    """Every worker's reader items from `start_step` on (see plan_worker_run): each worker
    plans all of them, so that exactly one of them verifies each shard, once per run."""
    first_epoch, done = locate_step(entries, seed, world, batch_size, start_step, epochs)
    plans, verified = [[] for _ in range(world)], set()
    for epoch in range(first_epoch, epochs):
        skip = done * batch_size if epoch == first_epoch else 0
        take = compute_epoch_steps(entries, seed, epoch, world, batch_size) * batch_size - skip
        for rank in range(world):
            for item in plan_worker_epoch(entries, seed, epoch, rank, world, skip, take):
                shard_id = json.loads(item[ITEM_SHARD])["id"]
                item[ITEM_VERIFY] = shard_id not in verified
                verified.add(shard_id)
                plans[rank].append(item)
    return plans


def iter_item_samples(item: dict, build_uri: str, seed: int) -> Iterator[dict]:
    """Sample rows of one reader item, in the epoch's within-shard order; a shard whose
    bytes do not match the manifest's sha256 raises (ITEM_VERIFY items: once per run)."""
    entry, epoch = json.loads(item[ITEM_SHARD]), int(item[ITEM_EPOCH])
    fs, build_path = storage.open_storage(build_uri)
    samples = shards.read_shard_samples(fs, build_path, entry, verify=bool(item.get(ITEM_VERIFY, False)))
    order = np.random.default_rng([seed, epoch, entry["id"] + 1]).permutation(len(samples))
    skip = int(item[ITEM_SKIP])
    take = int(item.get(ITEM_TAKE, len(samples) - skip))
    for i in order[skip:skip + take]:
        yield {**samples[i], EPOCH: epoch}
