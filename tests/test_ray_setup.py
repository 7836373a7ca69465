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


def test_local_workers_run_the_setup_hook_and_inherit_the_offline_env(ray_session):
    """A local instance passes no runtime env (it would make Ray start every worker through
    its runtime-env agent): its workers inherit the settings and run the setup hook from the
    environment the raylet was started with, and the driver keeps no trace of the hook."""
    import os

    from pipelines import ray_setup
    from ray._private import ray_constants

    @ray_session.remote
    def worker_settings() -> tuple[dict, bool]:
        import logging

        from pipelines import ray_setup as worker_setup

        name, fragment = worker_setup.KNOWN_NOISE[0]
        hooked = any(
            isinstance(f, worker_setup.DropMessage) and f.fragment == fragment for f in logging.getLogger(name).filters
        )
        return {k: os.environ.get(k) for k in worker_setup.OFFLINE_ENV}, hooked

    env, hooked = ray_session.get(worker_settings.remote())
    assert env == {k: os.environ[k] for k in ray_setup.OFFLINE_ENV}
    assert hooked  # quiet_ray_logs ran when the worker started, before any of our code
    assert ray_constants.WORKER_PROCESS_SETUP_HOOK_ENV_VAR not in os.environ
    assert not ray_session.get_runtime_context().runtime_env


def test_a_warm_entry_module_colon_function_also_calls_the_function():
    """A prepare job warms img2dataset's downloader (a load, not an import: the package's own
    __init__ stays deferred); checked in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import sys; from pipelines import ray_setup; assert 'img2dataset.downloader' not in sys.modules; "
        "ray_setup.import_modules(('pipelines.img2dataset_modules:load_downloader',)); "
        "assert 'img2dataset.downloader' in sys.modules and 'img2dataset.main' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
