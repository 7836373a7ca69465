"""The embedded default: the local Ray instance every job and test starts lives on loopback
(GCS, raylet, workers), not on the machine's routable address that Ray would pick."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray


def test_local_instance_uses_loopback_only(ray_session):
    ray = ray_session

    @ray.remote
    def worker_address() -> str:
        import ray.util
        return ray.util.get_node_ip_address()

    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]} == {"127.0.0.1"}
    assert ray.get(worker_address.remote()) == "127.0.0.1"
