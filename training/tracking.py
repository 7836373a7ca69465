"""Where training metrics go: metrics.jsonl and TensorBoard on rank 0, nowhere on other
ranks (a null tracker chosen once, so the loop has no `if rank == 0`); and the console,
where the driver prints one line per logging window from rank 0's `ray.train.report`
(ReportForwarder on the Ray Train controller -> a Ray queue -> `follow_reports`)."""
from __future__ import annotations

import contextlib
import json
import logging
import queue as queue_lib
import threading
from pathlib import Path

import ray.train
from ray.util.queue import Queue

from pipelines.console import Progress

log = logging.getLogger("training")


class NullTracker:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


class FileTensorBoardTracker:
    def __init__(self, tensorboard_dir: str | None, metrics_path: str | None = None):
        self.writer, self.metrics_path = None, metrics_path
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(tensorboard_dir)

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics_path:
            Path(self.metrics_path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def build_tracker(rank: int, tensorboard_dir: str | None, metrics_path: str | None = None):
    return FileTensorBoardTracker(tensorboard_dir, metrics_path) if rank == 0 else NullTracker()


class ReportForwarder(ray.train.UserCallback):
    """Runs on the Ray Train controller: rank 0's metrics of every report, to the driver."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "step" in metrics[0]:
            self.reports.put(dict(metrics[0]))


def console_fields(metrics: dict) -> dict:
    fields = {"loss": metrics.get("loss/total"), "temp": metrics.get("temperature"),
              "samples/s": metrics.get("samples_per_s")}
    return {k: float(v) for k, v in fields.items() if v is not None}


@contextlib.contextmanager
def follow_reports(total_steps: int):
    """(Ray queue for ReportForwarder) and, while the block runs, one console line per
    report: `train  step 120/468  26%  loss 2.31 ...  3.1 steps/s  eta 1m30s`."""
    reports, stop = Queue(actor_options={"num_cpus": 0}), threading.Event()
    progress = Progress("train", total_steps, "step", every_s=0)

    def pump(block: bool) -> bool:
        try:
            metrics = reports.get(block=block, timeout=0.5 if block else None)
        except queue_lib.Empty:  # ray.util.queue.Empty is one
            return False
        progress.set(int(metrics["step"]), **console_fields(metrics))
        return True

    def follow() -> None:
        while not stop.is_set():
            pump(True)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield reports
    finally:
        stop.set()
        thread.join()
        while pump(False):
            pass
        progress.close()
        reports.shutdown()
