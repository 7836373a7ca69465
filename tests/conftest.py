"""Shared fixtures: offline environment, one local Ray instance per session (on loopback),
and a small demo corpus served by a loopback mirror."""

from __future__ import annotations

import os
import socket

for _key, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    # Ray Train's controller polls its workers every 2 s by default: noticing a
    # finished or failed worker group took ~1-2 s of every one of the suite's
    # short runs. A test instance polls loopback workers 8x as often.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("RAY_ADDRESS", None)  # tests never join an outside cluster

import pytest  # noqa: E402

RAY_TEST_CPUS = 4  # logical: 2 training workers + their data actors, on 2 real cores


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def single_torch_thread():
    """One intra-op thread: on a shared CPU, OpenMP threads waiting on each other make the
    tiny model's steps up to 50x slower; results do not depend on it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every `ray` test (starting one costs seconds)."""
    import ray

    from pipelines import ray_setup

    ray_setup.init_ray(num_cpus=RAY_TEST_CPUS)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory):
    """A 48-image demo corpus (plus its eval split), and a TSV served from a loopback
    mirror that includes a dead URL and corrupt files; yields (corpus, tsv path)."""
    from pipelines.demo_corpus import write_cc12m_tsv, write_demo_corpus
    from pipelines.mirror import LoopbackMirror

    root = tmp_path_factory.mktemp("corpus")
    corpus = write_demo_corpus(root / "corpus", n_images=48, seed=3, n_eval_per_class=1, n_eval_retrieval=20)
    with LoopbackMirror(corpus.mirror_root) as mirror:
        tsv = write_cc12m_tsv(corpus, mirror.base_url, root / "cc12m.tsv", n_dead=1, n_corrupt=2)
        yield corpus, tsv


PREPARE_ARGS = [
    "--allow-loopback-urls",
    "--image-size",
    "32",
    "--shard-size",
    "6",
    "--threads-per-task",
    "4",
    "--timeout",
    "5",
]


@pytest.fixture(scope="session")
def small_build(ray_session, small_corpus, tmp_path_factory):
    """The small corpus prepared by prepare_cc12m.py; yields (corpus, tsv, out, build uri)."""
    from pipelines import prepare_cc12m

    corpus, tsv = small_corpus
    out = tmp_path_factory.mktemp("shards")
    build_uri = prepare_cc12m.main(["--input", str(tsv), "--output", str(out), *PREPARE_ARGS])
    return corpus, tsv, out, build_uri


S3_BUCKET = "clipforge-test"
S3_TEST_SECRET = "clipforge-test-secret-7f3a"  # distinctive: tests check it is never written


@pytest.fixture
def s3_env(monkeypatch):
    """A moto S3 server on 127.0.0.1 and the standard AWS variables pointing at it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "clipforge-test-key-id",
        "AWS_SECRET_ACCESS_KEY": S3_TEST_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import urllib.request

    # moto keeps its state per process, across server instances: start every test empty.
    urllib.request.urlopen(
        urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"), timeout=10
    ).close()
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(S3_BUCKET)
    yield env
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
