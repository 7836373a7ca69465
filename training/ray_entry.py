"""What Ray Train's controller process unpickles from a run: the worker function and the
report callback. Kept light on purpose: the controller only schedules, so it must not pay
for importing the training code (torch, open_clip, POT and the rest take ~9 s on two cores,
on the path of every launch); the worker imports it when the function runs."""

from __future__ import annotations

import ray.train


def train_loop_per_worker(loop_config: dict) -> None:
    from training import train  # in the worker process only

    train.run_worker(loop_config)


class ReportForwarder(ray.train.UserCallback):
    """Runs on the Ray Train controller: rank 0's metrics of every report, to the driver."""

    def __init__(self, reports):
        self.reports = reports  # a ray.util.queue.Queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if metrics and "step" in metrics[0]:
            self.reports.put(dict(metrics[0]))
