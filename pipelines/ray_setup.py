"""Starting or joining Ray the same way in every job (local instance by default)."""
from __future__ import annotations

import logging
import os

import ray
from ray._private import ray_constants

from pipelines import console

# Set for every process Ray starts: no usage reporting, no update checks, no hub access.
OFFLINE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
               "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}

# Ray replaces 127.0.0.1 by the machine's routable address (`resolve_ip_for_localhost`), so
# `_node_ip_address="127.0.0.1"` alone still binds the GCS and workers to e.g. eth0. Only a
# single-node instance keeps loopback; Ray spells that switch with its Windows/macOS flag,
# read once at import, and then refuses to add nodes (a local instance never has any).
LOOPBACK_ENV = {ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR: "0"}


def keep_on_loopback() -> None:
    """Make a Ray instance started from this process use 127.0.0.1 for every address."""
    os.environ.update(LOOPBACK_ENV)  # the processes Ray starts import it afresh
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported it already


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local instance on
    loopback. Idempotent."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    # Credentials are never put into the runtime env (it is stored by the cluster): local
    # workers inherit this process's environment, cluster pods get theirs from secrets.
    env = {**OFFLINE_ENV, console.VERBOSE_ENV: "1" if console.is_verbose() else "0"}
    # Every process Ray starts filters the same known noise as this one (console.py).
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "pipelines.console.quiet_ray_logs"}
    level = logging.INFO if console.is_verbose() else logging.WARNING
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, logging_level=level)
    else:
        # address="local": the embedded default never attaches to some other cluster that
        # happens to run on this machine; join one explicitly with --ray-address/RAY_ADDRESS.
        keep_on_loopback()
        # Token authentication is Ray 2.60's default for a new instance; asking for it by
        # name keeps it and drops the warning Ray prints when the mode was left unset.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env=runtime_env, logging_level=level, _node_ip_address="127.0.0.1")
