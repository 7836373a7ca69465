"""Where training metrics go: metrics.jsonl and TensorBoard on rank 0, nowhere on other
ranks (a null tracker chosen once, so the loop has no `if rank == 0`). The console line per
window is printed by the driver (training/train.py `follow_reports`)."""
from __future__ import annotations

import json
import logging
from pathlib import Path


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
