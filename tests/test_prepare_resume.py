"""A prepare job killed with SIGKILL mid-build (driver and its local Ray instance, as a lost
node would) and started again ends with exactly the expected keys: no duplicates, nothing
lost, no partial shard taken for complete; against a local folder and against `s3://` on a
loopback moto server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import storage
from pipelines.captions import sample_key
from pipelines.demo_corpus import read_corpus_records, write_cc12m_tsv, write_demo_corpus
from pipelines.mirror import LoopbackMirror
from tests.build_checks import check_build
from tests.conftest import S3_BUCKET

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--allow-loopback-urls", "--image-size", "32", "--shard-size", "3", "--threads-per-task", "1", "--timeout", "5"]


def start_prepare(tsv, output: str, env: dict) -> subprocess.Popen:
    """The job in its own process group, so that one signal reaches the driver and the Ray
    processes it started."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "pipelines" / "prepare_cc12m.py"), "--input", str(tsv), "--output", output, *ARGS],
        env=env,
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until(predicate, timeout_s: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("no shard was fetched in time")
        time.sleep(0.2)


def kill_and_resume(tsv, output: str, env: dict) -> str:
    fs, root = storage.open_storage(output)
    proc = start_prepare(tsv, output, env)

    def some_shard_fetched() -> bool:
        fs.invalidate_cache()  # s3fs would answer from its listing cache
        return bool(fs.glob(f"{root}/cc12m/*/staging/index/*.parquet"))

    wait_until(some_shard_fetched, 240, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    fs.invalidate_cache()
    assert not fs.glob(f"{root}/cc12m/*/manifest.json"), "killed too late: the build had finished"
    resumed = start_prepare(tsv, output, env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    if "AWS_SECRET_ACCESS_KEY" in env:
        assert env["AWS_SECRET_ACCESS_KEY"] not in out  # credentials never reach the logs
    assert "already fetched" in out  # it resumed rather than starting over
    fs.invalidate_cache()
    (build_dir,) = fs.glob(f"{root}/cc12m/*")
    return f"s3://{build_dir}" if output.startswith("s3://") else build_dir


@pytest.fixture
def slow_corpus(tmp_path):
    """24 images behind a mirror that answers each request after 0.3 s: a build long enough
    to be killed in the middle."""
    corpus = write_demo_corpus(
        tmp_path / "corpus", n_images=24, image_size=48, seed=5, n_eval_per_class=1, n_eval_retrieval=1
    )
    with LoopbackMirror(corpus.mirror_root, delay_s=0.3) as mirror:
        tsv = write_cc12m_tsv(corpus, mirror.base_url, tmp_path / "cc12m.tsv", n_dead=1, n_corrupt=0)
        expected = {sample_key(f"{mirror.base_url}/{r['path']}") for r in read_corpus_records(corpus.corpus_jsonl)}
        yield tsv, expected


def test_killed_build_resumes_to_exactly_the_expected_keys_locally(slow_corpus, tmp_path):
    tsv, expected = slow_corpus
    build_uri = kill_and_resume(tsv, str(tmp_path / "shards"), dict(os.environ))
    manifest, metas = check_build(build_uri)
    assert set(metas) == expected
    assert manifest["counts"]["failed"] == {"http_404": 1}


def test_killed_build_resumes_to_exactly_the_expected_keys_on_s3(slow_corpus, s3_env):
    """Input TSV and build both on S3."""
    import s3fs

    tsv, expected = slow_corpus
    s3fs.S3FileSystem().put(str(tsv), f"{S3_BUCKET}/inputs/cc12m.tsv")
    build_uri = kill_and_resume(
        f"s3://{S3_BUCKET}/inputs/cc12m.tsv", f"s3://{S3_BUCKET}/shards", {**os.environ, **s3_env}
    )
    manifest, metas = check_build(build_uri)
    text = json.dumps(manifest)
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in text and s3_env["AWS_ACCESS_KEY_ID"] not in text
    assert set(metas) == expected
    assert manifest["counts"]["failed"] == {"http_404": 1}
