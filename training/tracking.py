"""Where training metrics go: metrics.jsonl and TensorBoard under the run directory (local or
s3://) and Weights & Biases when `run.wandb_project` names a project, on rank 0, nowhere on
other ranks (a null tracker chosen once, so the loop has no
`if rank == 0`). The console line per window is printed by the driver (training/train.py
`follow_reports`).

An attempt that starts at step k (a resume, or Ray Train restarting a failed worker group from
its latest checkpoint) first drops every line an earlier attempt logged after step k, and
TensorBoard purges those steps, so that each step is logged exactly once. Every line records
the `start_step` of the attempt that logged it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from pipelines import storage

log = logging.getLogger("training")
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class NullTracker:
    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


class MetricsLog:
    """metrics.jsonl: appended in place on a local disk; on object storage (no append) the
    whole file is rewritten atomically after every window (a few kB per thousand steps)."""

    def __init__(self, uri: str, start_step: int):
        self.fs, self.path = storage.open_storage(uri)
        self.local = is_local(uri)
        self.start_step = start_step
        old = storage.read_bytes(self.fs, self.path).decode().splitlines() if self.fs.exists(self.path) else []
        self.lines = [line for line in old if line.strip() and json.loads(line).get("step", 0) <= start_step]
        if len(self.lines) != len(old) or not self.local:
            self._rewrite()

    def _rewrite(self) -> None:
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        storage.write_bytes_atomic(self.fs, self.path, "".join(line + "\n" for line in self.lines).encode())

    def append(self, step: int, metrics: dict) -> None:
        line = json.dumps({"step": step, "start_step": self.start_step, **metrics})
        self.lines.append(line)
        if not self.local:
            self._rewrite()
            return
        with self.fs.open(self.path, "a") as f:
            f.write(line + "\n")


class TensorBoardLog:
    """A SummaryWriter that purges the steps after `start_step`; on object storage it writes
    into a local folder and uploads its event files after every flush."""

    def __init__(self, uri: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.uri = uri
        self.remote = None if is_local(uri) else tempfile.mkdtemp(prefix="tensorboard-")
        self.writer = SummaryWriter(self.remote or uri, purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        fs, path = storage.open_storage(self.uri)
        for local in Path(self.remote).iterdir():
            storage.put_file_atomic(fs, str(local), storage.join(path, local.name))

    def close(self) -> None:
        self.writer.close()
        if self.remote:
            self._upload()
            shutil.rmtree(self.remote, ignore_errors=True)


def wandb_settings(project: str | None, run_name: str, run_dir: str, config: dict) -> dict | None:
    """What rank 0 needs to open the run's Weights & Biases run, fixed on the driver: its
    WANDB_MODE and WANDB_DIR (the workers' environment is the cluster's, not the driver's), and a
    run id stable across resumes of this run directory."""
    if not project:
        return None
    try:
        import wandb  # noqa: F401
    except ImportError as err:
        raise SystemExit("run.wandb_project needs Weights & Biases: pip install wandb") from err
    digest = hashlib.sha1(run_dir.encode()).hexdigest()[:8]
    return {
        "project": project,
        "name": run_name,
        "id": f"{re.sub(r'[^A-Za-z0-9_-]', '-', run_name)}-{digest}",
        "mode": os.environ.get("WANDB_MODE"),
        "dir": os.environ.get("WANDB_DIR"),
        "config": config,
    }


class WandbLog:
    """A Weights & Biases run (online, offline or disabled as WANDB_MODE says), resumed under the
    same id. W&B keeps each step's first value: after a restart from step k it keeps what the
    earlier attempt logged for the steps after k (metrics.jsonl and TensorBoard replace them)."""

    def __init__(self, settings: dict):
        import wandb

        self.run = wandb.init(
            project=settings["project"],
            name=settings["name"],
            id=settings["id"],
            resume="allow",
            mode=settings["mode"],
            dir=settings["dir"],
            config=settings["config"],
        )

    def log(self, step: int, metrics: dict) -> None:
        self.run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.run.finish()


class RunTracker:
    def __init__(
        self, metrics_uri: str | None, tensorboard_uri: str | None, start_step: int = 0, wandb: dict | None = None
    ):
        self.metrics = MetricsLog(metrics_uri, start_step) if metrics_uri else None
        self.tensorboard = TensorBoardLog(tensorboard_uri, start_step) if tensorboard_uri else None
        self.wandb = WandbLog(wandb) if wandb else None

    def log(self, step: int, metrics: dict) -> None:
        if self.metrics:
            self.metrics.append(step, metrics)
        for sink in (self.tensorboard, self.wandb):
            if sink:
                sink.log(step, metrics)

    def close(self) -> None:
        for sink in (self.tensorboard, self.wandb):
            if sink:
                sink.close()


def build_tracker(
    rank: int, run_dir: str, tensorboard_dir: str | None = None, start_step: int = 0, wandb: dict | None = None
):
    """Rank 0's tracker: <run_dir>/metrics.jsonl, TensorBoard in `tensorboard_dir` (default
    <run_dir>/tensorboard) and, with `wandb` settings, W&B; a null tracker on every other rank."""
    if rank != 0:
        return NullTracker()
    return RunTracker(
        storage.join(run_dir, METRICS_FILE),
        tensorboard_dir or storage.join(run_dir, TENSORBOARD_DIR),
        start_step,
        wandb,
    )
