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


def test_input_digests_hash_small_local_files_here_and_others_in_tasks(ray_session, tmp_path, monkeypatch):
    import hashlib
    from pipelines import build
    small, large = tmp_path / "small.tsv", tmp_path / "large.tsv"
    small.write_bytes(b"url\tcaption\n" * 10)
    large.write_bytes(bytes(range(256)) * 4096)
    monkeypatch.setattr(build, "DRIVER_HASH_MAX_BYTES", 1000)
    assert build._hashed_here(str(large)) is None  # over the limit: a Ray task hashes it
    digests = build.input_digests([str(large), str(small)])
    assert digests == [hashlib.sha256(p.read_bytes()).hexdigest() for p in (large, small)]
    assert build._hashed_here(str(small)) == digests[1]


def test_warm_workers_import_the_modules_in_workers_of_this_job(ray_session):
    import os

    from pipelines import ray_setup
    pids = ray_session.get(ray_setup.warm_workers(("pipelines.build", "json"), n_workers=2))
    assert len(pids) == 2 and os.getpid() not in pids
    with pytest.raises(ray_session.exceptions.RayTaskError):  # a wrong name is not hidden
        ray_session.get(ray_setup.warm_workers(("pipelines.no_such_module",), n_workers=1))
