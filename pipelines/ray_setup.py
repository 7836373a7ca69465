"""Starting or joining Ray the same way in every job (local instance by default)."""
from __future__ import annotations

import os

import ray

# Set for every process Ray starts: no usage reporting, no update checks, no hub access.
OFFLINE_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1",
               "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS); else start a local instance on
    loopback. Idempotent."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return
    # Credentials are never put into the runtime env (it is stored by the cluster): local
    # workers inherit this process's environment, cluster pods get theirs from secrets.
    env = dict(OFFLINE_ENV)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env})
    else:
        # address="local": the embedded default never attaches to some other cluster that
        # happens to run on this machine; join one explicitly with --ray-address/RAY_ADDRESS.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": env}, _node_ip_address="127.0.0.1")
