"""The documented cluster path: `ray start --head` on loopback (token auth, as in Ray 2.60's
default) and `ray job submit --working-dir . -- python pipelines/prepare_cc12m.py ...`."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines import ray_setup, shards
from tests.conftest import free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")



@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """A one-node cluster on 127.0.0.1, stopped through the process that started it."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", **ray_setup.LOOPBACK_ENV,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    # Every port explicit: the session's local Ray instance already holds Ray's defaults.
    ports = {flag: free_port() for flag in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                           "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                           "metrics-export-port", "node-manager-port",
                                           "object-manager-port")}
    log = open(tmp_path_factory.mktemp("head") / "head.log", "w")
    short_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay < 108 bytes
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         *[f"--{flag}={port}" for flag, port in ports.items()],
         "--min-worker-port=0", "--max-worker-port=0",  # workers take free ports
         "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={short_dir}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(dashboard, head, log)
        yield address, env
    finally:
        head.terminate()  # --block: the head tears its own processes down on SIGTERM
        head.wait(timeout=60)
        log.close()
        shutil.rmtree(short_dir, ignore_errors=True)


def log_tail(log) -> str:
    return Path(log.name).read_text()[-3000:]


def wait_for_dashboard(port: int, head: subprocess.Popen, log, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.poll() is None, "ray start --head exited: " + log_tail(log)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError("the dashboard never came up")


def test_prepare_cc12m_through_ray_job_submit(head_node, small_corpus, tmp_path):
    address, env = head_node
    corpus, tsv = small_corpus
    out = tmp_path / "shards"
    result = subprocess.run(
        [RAY, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
         "python", "pipelines/prepare_cc12m.py", "--input", str(tsv), "--output", str(out),
         "--image-size", "32", "--shard-size", "16", "--threads-per-task", "4",
         "--allow-loopback-urls"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    (build_dir,) = (out / "cc12m").iterdir()
    counts = shards.read_manifest(str(build_dir))["counts"]
    assert counts["written"] == corpus.n_images
    assert counts["failed"] == {"http_404": 1, "truncated_image": 1, "not_an_image": 1}


def submit(head_node, script: str, *args: str) -> str:
    address, env = head_node
    result = subprocess.run(
        [RAY, "job", "submit", f"--address={address}", f"--working-dir={ROOT}", "--",
         "python", f"pipelines/{script}", *args, "--image-size", "32", "--shard-size", "8",
         "--threads-per-task", "4", "--allow-loopback-urls"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    return result.stdout


def test_prepare_yfcc15m_and_sharegpt4v_through_ray_job_submit(head_node, tmp_path):
    from pipelines.mirror import LoopbackMirror
    from tests.build_checks import captions_by_source, check_build
    from tests.corpus_fixtures import write_sharegpt4v_fixture, write_yfcc_fixture
    (tmp_path / "yfcc" / "mirror").mkdir(parents=True)
    with LoopbackMirror(tmp_path / "yfcc" / "mirror") as mirror:
        fx = write_yfcc_fixture(tmp_path / "yfcc", mirror.base_url, n_photos=4)
        submit(head_node, "prepare_yfcc15m.py", "--joined", str(fx.joined_parquet),
               "--output", str(tmp_path / "out"))
    (build_dir,) = (tmp_path / "out" / "yfcc15m").iterdir()
    assert captions_by_source(check_build(str(build_dir))[1]) == fx.expected_captions
    sg = write_sharegpt4v_fixture(tmp_path / "sharegpt4v", n_records=6)
    submit(head_node, "prepare_sharegpt4v.py", "--captions", str(sg.json_path), "--image-root",
           str(sg.image_root), "--coco-captions", str(sg.coco_captions_json),
           "--validation-records", "2", "--output", str(tmp_path / "out"))
    (val_dir,) = (tmp_path / "out" / "sharegpt4v-val2").iterdir()
    assert captions_by_source(check_build(str(val_dir))[1]) == sg.expected_captions(range(2))


def test_the_head_node_and_its_jobs_use_loopback_only(head_node):
    # Ray swaps 127.0.0.1 for the machine's routable address unless told it is single-node.
    code = ("import ray; ray.init(); import ray.util; "
            "print('addresses', ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address(), "
            "*sorted({n['NodeManagerAddress'] for n in ray.nodes()}))")
    address, env = head_node
    result = subprocess.run([RAY, "job", "submit", f"--address={address}", "--", "python", "-c", code],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (line,) = [x for x in result.stdout.splitlines() if x.startswith("addresses ")]
    gcs, node_ip, *managers = line.split()[1:]
    assert gcs.startswith("127.0.0.1:") and node_ip == "127.0.0.1" and managers == ["127.0.0.1"]
