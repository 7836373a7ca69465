"""The training data stage: one worker's deterministic slice of the run's builds (`data_order`),
read and prepared on Ray Data actors (`batches.BatchPreprocessor`) into the batches the loop
consumes. A module of its own because each of its actors imports it: it pulls in the data
code (open_clip's tokenizer included) but not the model, the optimiser or the job driver.
It is given only its own section (`DataConfig`), the run's seed and length, and the sample
geometry read from the built towers."""

from __future__ import annotations

import ray
import ray.data

from training import data_order
from training.data_order import Source
from training.batches import BatchPreprocessor
from training.config import DataConfig
from training.towers import SampleGeometry


def iter_worker_batches(
    data: DataConfig,
    seed: int,
    epochs: int,
    sources: list[Source],
    rank: int,
    world: int,
    start_step: int,
    geometry: SampleGeometry,
):
    """This worker's prepared batches from `start_step` to the end of the last epoch, from
    one Ray Data stream (its actors live for the whole run, not one epoch)."""
    items = data_order.plan_worker_run(sources, seed, rank, world, data.batch_size_per_worker, start_step, epochs)
    dataset = build_run_dataset(data, seed, items, geometry)
    yield from dataset.iter_batches(
        batch_size=data.batch_size_per_worker,
        batch_format="numpy",
        drop_last=True,
        prefetch_batches=data.prefetch_batches,
    )


class PrepareShardItems:
    """Ray Data stage: reader items (one shard each) -> prepared batches. Reading and
    preparing share one actor so that a worker's data pipeline holds exactly
    `preprocess_concurrency` CPUs and can never starve its own read tasks."""

    def __init__(self, data: DataConfig, seed: int, geometry: SampleGeometry):
        self.seed = seed
        self.batch_size = data.batch_size_per_worker
        self.prepare = BatchPreprocessor.for_run(geometry, data, seed)

    def __call__(self, items: dict):
        for i in range(len(items[data_order.ITEM_SHARD])):
            item = {k: v[i] for k, v in items.items()}
            rows = list(data_order.iter_item_samples(item, self.seed))
            for start in range(0, len(rows), self.batch_size):
                yield self.prepare.prepare_rows(rows[start : start + self.batch_size])


def build_run_dataset(data: DataConfig, seed: int, items: list[dict], geometry: SampleGeometry):
    """Ray Data: this worker's shards, in order, prepared on CPU actors."""
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the data order is part of the run
    context.enable_progress_bars = False
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        PrepareShardItems,
        fn_constructor_args=(data, seed, geometry),
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=data.preprocess_concurrency),
    )
