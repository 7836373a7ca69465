"""Deterministic data order over shards: which shards each worker reads in an epoch, in
which order, and where a resumed run picks up, all as functions of (seed, epoch, step).

The run reads one build or a mixture of builds (`Source`s with sampling weights). Each
source is a stream of whole shards: cycle c of source b is a permutation of all its shards
(seeded by (seed, c, b)), and the cycles follow one another. Epoch e takes from each stream
the shards whose cumulative sample count crosses round(e·w_b·N) .. round((e+1)·w_b·N), N the
sources' samples summed: a source's share of samples is its weight, to within one shard per
epoch and without drift (the targets are cumulative), a light source is not repeated before
all its shards were read, a heavy one cycles. The epoch's shards are then permuted and
worker r reads shards r, r+W, ...; samples inside a shard are permuted per (seed, cycle,
shard, source). With one source, epoch e is exactly cycle e: the order of single-build runs
started before mixtures existed is unchanged, so they resume exactly. Every worker takes
the same number of steps per epoch (the smallest worker's sample count // batch size), so
steps line up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from pipelines import shards, storage
from training.batches import EPOCH

ITEM_SHARD = "shard"
ITEM_SKIP = "skip"
ITEM_TAKE = "take"
ITEM_EPOCH = "epoch"
ITEM_VERIFY = "verify"  # this read is the shard's first of the run: check its sha256
ITEM_BUILD, ITEM_SOURCE, ITEM_CYCLE = "build", "source", "cycle"  # where the shard lives, which stream pass


@dataclass(frozen=True)
class Source:
    """One build of a run's data: its root URI, its sampling weight (normalised over the
    run's sources) and its manifest's shard entries."""

    uri: str
    weight: float
    entries: list[dict]
    digest: str = ""

    @property
    def n_samples(self) -> int:
        return sum(e["n_samples"] for e in self.entries)


class ShardRead(NamedTuple):
    """One shard of an epoch: its manifest entry, its source's index and its cycle."""

    entry: dict
    source: int
    cycle: int


def single_source(entries: list[dict], uri: str = "") -> list[Source]:
    return [Source(uri, 1.0, entries)]


def cycle_permutation(n: int, seed: int, source: int, cycle: int) -> np.ndarray:
    key = [seed, cycle, 0] if source == 0 else [seed, cycle, 0, source]
    return np.random.default_rng(key).permutation(n)


def stream_position(sizes: np.ndarray, seed: int, source: int, target: int) -> tuple[int, int]:
    """(cycle, shards of that cycle) read once the stream has passed `target` samples: the
    shards whose samples start before `target` are all read."""
    cycle, rest = divmod(target, int(sizes.sum()))
    if rest == 0:
        return cycle, 0
    order = cycle_permutation(len(sizes), seed, source, cycle)
    return cycle, int(np.searchsorted(np.cumsum(sizes[order]), rest, side="left")) + 1


def stream_slice(src: Source, index: int, seed: int, start: tuple[int, int], stop: tuple[int, int]) -> list[ShardRead]:
    reads = []
    for cycle in range(start[0], stop[0] + 1):
        order = cycle_permutation(len(src.entries), seed, index, cycle)
        lo = start[1] if cycle == start[0] else 0
        hi = stop[1] if cycle == stop[0] else len(order)
        reads += [ShardRead(src.entries[i], index, cycle) for i in order[lo:hi]]
    return reads


def source_epoch(src: Source, index: int, seed: int, epoch: int, total: int) -> list[ShardRead]:
    sizes = np.array([e["n_samples"] for e in src.entries], dtype=np.int64)
    start, stop = (stream_position(sizes, seed, index, round(e * src.weight * total)) for e in (epoch, epoch + 1))
    return stream_slice(src, index, seed, start, stop)


def order_shards(sources: list[Source], seed: int, epoch: int) -> list[ShardRead]:
    """The epoch's shards, in the order the workers' round robin deals them."""
    if len(sources) == 1:
        src = sources[0]
        return [ShardRead(src.entries[i], 0, epoch) for i in cycle_permutation(len(src.entries), seed, 0, epoch)]
    total = sum(src.n_samples for src in sources)
    reads = [r for b, src in enumerate(sources) for r in source_epoch(src, b, seed, epoch, total)]
    return [reads[i] for i in np.random.default_rng([seed, epoch, 1]).permutation(len(reads))]


def worker_shards(sources: list[Source], seed: int, epoch: int, rank: int, world: int) -> list[ShardRead]:
    return order_shards(sources, seed, epoch)[rank::world]


def compute_epoch_steps(sources: list[Source], seed: int, epoch: int, world: int, batch_size: int) -> int:
    reads = order_shards(sources, seed, epoch)
    totals = [sum(r.entry["n_samples"] for r in reads[rank::world]) for rank in range(world)]
    return min(totals) // batch_size


def locate_step(
    sources: list[Source], seed: int, world: int, batch_size: int, step: int, epochs: int
) -> tuple[int, int]:
    """(epoch, step within epoch) of a global step."""
    for epoch in range(epochs):
        n = compute_epoch_steps(sources, seed, epoch, world, batch_size)
        if step < n:
            return epoch, step
        step -= n
    return epochs, 0


def compute_total_steps(sources: list[Source], seed: int, world: int, batch_size: int, epochs: int) -> int:
    return sum(compute_epoch_steps(sources, seed, e, world, batch_size) for e in range(epochs))


def plan_worker_epoch(
    sources: list[Source],
    seed: int,
    epoch: int,
    rank: int,
    world: int,
    skip_samples: int,
    take_samples: int | None = None,
) -> list[dict]:
    """Reader items for one worker and epoch; the first `skip_samples` samples (already
    trained on before a resume) are skipped, whole shards without being read, and at most
    `take_samples` samples follow (the epoch's whole batches; None = all)."""
    return plan_reads(worker_shards(sources, seed, epoch, rank, world), sources, epoch, skip_samples, take_samples)


def plan_reads(
    reads: list[ShardRead], sources: list[Source], epoch: int, skip_samples: int, take_samples: int | None
) -> list[dict]:
    items = []
    remaining = float("inf") if take_samples is None else take_samples
    for read in reads:
        n = read.entry["n_samples"]
        if skip_samples >= n:
            skip_samples -= n
            continue
        if remaining <= 0:
            break
        take = int(min(n - skip_samples, remaining))
        items.append(
            {
                ITEM_SHARD: json.dumps(read.entry),
                ITEM_SKIP: skip_samples,
                ITEM_TAKE: take,
                ITEM_EPOCH: epoch,
                ITEM_BUILD: sources[read.source].uri,
                ITEM_SOURCE: read.source,
                ITEM_CYCLE: read.cycle,
            }
        )
        remaining, skip_samples = remaining - take, 0
    return items


def plan_worker_run(
    sources: list[Source], seed: int, rank: int, world: int, batch_size: int, start_step: int, epochs: int
) -> list[dict]:
    """Reader items for all of one worker's remaining steps: every epoch trimmed to its
    whole batches, so one stream of samples batches into exactly the run's steps. The
    item of each shard's first read in the run (by any worker) carries ITEM_VERIFY."""
    return plan_all_workers(sources, seed, world, batch_size, start_step, epochs)[rank]


def plan_all_workers(
    sources: list[Source], seed: int, world: int, batch_size: int, start_step: int, epochs: int
) -> list[list[dict]]:
    """Every worker's reader items from `start_step` on (see plan_worker_run): each worker
    plans all of them, so that exactly one of them verifies each shard, once per run."""
    first_epoch, done = locate_step(sources, seed, world, batch_size, start_step, epochs)
    plans = [[] for _ in range(world)]
    verified = set()
    for epoch in range(first_epoch, epochs):
        skip = done * batch_size if epoch == first_epoch else 0
        take = compute_epoch_steps(sources, seed, epoch, world, batch_size) * batch_size - skip
        reads = order_shards(sources, seed, epoch)
        for rank in range(world):
            for item in plan_reads(reads[rank::world], sources, epoch, skip, take):
                shard = (item[ITEM_SOURCE], json.loads(item[ITEM_SHARD])["id"])
                item[ITEM_VERIFY] = shard not in verified
                verified.add(shard)
                plans[rank].append(item)
    return plans


def within_shard_order(n: int, seed: int, item: dict, shard_id: int) -> np.ndarray:
    """The samples' order inside one shard read: per (seed, cycle, shard, source); with one
    source the cycle is the epoch, as before mixtures."""
    source = int(item.get(ITEM_SOURCE, 0))
    cycle = int(item.get(ITEM_CYCLE, item[ITEM_EPOCH]))
    key = [seed, cycle, shard_id + 1] + ([source] if source else [])
    return np.random.default_rng(key).permutation(n)


def iter_item_samples(item: dict, seed: int) -> Iterator[dict]:
    """Sample rows of one reader item, in its within-shard order; a shard whose bytes do
    not match the manifest's sha256 raises (ITEM_VERIFY items: once per run)."""
    entry = json.loads(item[ITEM_SHARD])
    epoch = int(item[ITEM_EPOCH])
    fs, build_path = storage.open_storage(item[ITEM_BUILD])
    samples = shards.read_shard_samples(fs, build_path, entry, verify=bool(item.get(ITEM_VERIFY, False)))
    skip = int(item[ITEM_SKIP])
    take = int(item.get(ITEM_TAKE, len(samples) - skip))
    for i in within_shard_order(len(samples), seed, item, entry["id"])[skip : skip + take]:
        yield {**samples[i], EPOCH: epoch}
