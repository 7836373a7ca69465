"""The logged figures are the whole worker group's: each window's numerators and denominators
summed over 2 gloo workers, then divided (not rank 0's figures alone)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.loop import MetricMeter


def run_rank(rank: int, port: int, out: str, mismatched: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        meter = MetricMeter()
        for step in range(2 + rank):  # rank 1 ran one step more in the window (counts differ too)
            metrics = {"loss/local": torch.tensor(1.0 + 10 * rank + step), "lr": 0.5}
            if mismatched and rank == 1:
                metrics["only/rank1"] = 1.0
            meter.update(metrics, samples=4 * (rank + 1), wait_s=0.25 * rank)
        meter.window_start -= 2.0  # a 2 s window (plus the few ms the steps took)
        try:
            result = meter.summary(2, torch.device("cpu"))
        except RuntimeError as err:
            result = {"error": str(err)}
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def two_workers(tmp_path, mismatched: bool = False) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(port, str(tmp_path), mismatched), nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def test_figures_are_summed_over_workers_then_divided(tmp_path):
    rank0, rank1 = two_workers(tmp_path)
    assert rank0 == rank1  # every worker reports the group's figures
    # loss/local: rank 0 logged 1, 2; rank 1 logged 11, 12, 13 -> (1 + 2 + 11 + 12 + 13) / 5
    assert rank0["loss/local"] == pytest.approx(39 / 5)
    assert rank0["lr"] == pytest.approx(0.5)
    # samples: 2·4 + 3·8 = 32 over the workers' mean window (~2 s); wait 0 + 3·0.25 over ~4 s
    assert rank0["samples_per_s"] == pytest.approx(32 / 2.0, rel=0.05)
    assert rank0["data_wait_fraction"] == pytest.approx(0.75 / 4.0, rel=0.05)


def test_workers_logging_different_metrics_is_an_error_not_a_hang(tmp_path):
    for result in two_workers(tmp_path, mismatched=True):
        assert "workers log different metrics" in result["error"]
