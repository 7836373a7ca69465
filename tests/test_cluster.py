"""The cluster path on a real multi-node Ray cluster (tests/loopback_cluster.py: a head and two
worker nodes on 127.0.0.1 inside a loopback-only network namespace): prepare -> train ->
evaluate through `ray job submit --working-dir .` exactly as the README tells users, and the
failures a cluster has: a training worker killed, a worker node lost and replaced. The
one cluster serves every test of the module (starting it costs ~20 s)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest

from pipelines import shards
from tests.loopback_cluster import BIN, LoopbackCluster, NamespaceUnavailable, wait_until_dead

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TRAIN_STEPS, CHECKPOINT_EVERY = 15, 3


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start(worker_nodes=2, cpus_per_node=2)
    except NamespaceUnavailable as err:
        cluster.stop()
        if os.environ.get("CI") == "true":  # a skip in CI would hide the whole cluster path
            pytest.fail(f"cannot make the loopback-only network namespace the cluster tests need: {err}")
        pytest.skip(f"no loopback-only network namespace here ({err}); the cluster tests need one")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def mirror(cluster, small_corpus):
    """The small corpus's mirror, inside the namespace, on the port its TSV's URLs name; each
    answer comes after 0.3-0.6 s, like a remote host's, so that a prepare job's downloads are
    still in flight when a test kills a node (a few seconds more per build)."""
    corpus, tsv = small_corpus
    port = urlparse(tsv.read_text().splitlines()[1].split("\t")[0]).port
    with cluster.mirror(corpus.mirror_root, port, latency_ms=(300, 600)):
        yield


@pytest.fixture(scope="module")
def build(cluster, mirror, small_corpus, tmp_path_factory):
    corpus, tsv = small_corpus
    out = tmp_path_factory.mktemp("cluster-shards")
    cluster.submit(
        "pipelines/prepare_cc12m.py",
        "--input",
        str(tsv),
        "--output",
        str(out),
        "--image-size",
        "32",
        "--shard-size",
        "6",
        "--threads-per-task",
        "4",
        "--allow-loopback-urls",
        submission_id="prepare",
    )
    (build_dir,) = (out / "cc12m").iterdir()
    return build_dir


def train_args(build_dir: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [
        "--data",
        str(build_dir),
        "--method",
        "flip",
        "--arch",
        "clip-micro-p8-32",
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--epochs",
        "8",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--max-steps",
        str(TRAIN_STEPS),
        "--storage",
        str(storage),
        "--run-name",
        name,
        "--log-every",
        "1",
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        "--set",
        "run.placement_strategy=STRICT_SPREAD",
        *extra,
    ]


def logged(storage: Path, name: str) -> list[dict]:
    """The run's complete metrics lines (a line being appended right now is left out)."""
    path = storage / name / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.split("\n")[:-1]]


@pytest.fixture(scope="module")
def straight(cluster, build, tmp_path_factory):
    storage = tmp_path_factory.mktemp("cluster-runs")
    stdout = cluster.submit("training/train.py", *train_args(build, storage, "straight"))
    return storage, stdout


def worker_nodes(stdout: str) -> dict[int, str]:
    return {int(r): node for r, node in re.findall(r"train worker (\d+)/2 on node (\w+)", stdout)}


def test_prepare_job_tasks_spread_over_the_worker_nodes(cluster, build, small_corpus):
    corpus, _ = small_corpus
    counts = shards.read_manifest(str(build))["counts"]
    assert counts["written"] == corpus.n_images
    assert counts["failed"] == {"http_404": 1, "truncated_image": 1, "not_an_image": 1}
    head = [n["node_id"] for n in cluster.alive_nodes() if n["is_head_node"]]
    # the stages' tasks and actors (they need CPUs; the head has none, it runs the driver and
    # Ray Data's zero-CPU bookkeeping actors)
    stage_nodes = {
        t["node_id"]
        for t in cluster.job_tasks("prepare")
        if t.get("required_resources", {}).get("CPU", 0) > 0 and t.get("node_id")
    }
    assert len(stage_nodes) == 2 and not stage_nodes & set(head), stage_nodes


def test_training_runs_one_worker_per_node_and_evaluation_reads_it(cluster, straight, small_corpus, tmp_path):
    storage, stdout = straight
    placed = worker_nodes(stdout)
    assert sorted(placed) == [0, 1] and len(set(placed.values())) == 2, stdout[-3000:]
    assert [r["step"] for r in logged(storage, "straight")] == list(range(1, TRAIN_STEPS + 1))
    corpus, _ = small_corpus
    cluster.submit(
        "evaluation/evaluate.py",
        "--checkpoint",
        str(storage / "straight"),
        "--zeroshot",
        str(corpus.zeroshot_dir),
        "--output",
        str(tmp_path / "report"),
        "--cache",
        str(tmp_path / "cache"),
        "--num-encoders",
        "2",
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["checkpoint"]["step"] == TRAIN_STEPS
    assert 0 <= report["zeroshot"]["zeroshot"]["top1"] <= 1


class JobOutput:
    """A submitted job's console, read line by line while it runs; a job still running when
    the test ends (it failed) is stopped, so that it cannot hold the cluster's CPUs."""

    def __init__(self, cluster: LoopbackCluster, script: str, *args: str):
        self.cluster, self.id = cluster, f"job-{uuid.uuid4().hex[:12]}"
        command = cluster.prefix() + cluster.submit_command(script, *args, submission_id=self.id)
        self.process = subprocess.Popen(
            command, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def wait_for(self, predicate, what: str, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.process.poll() is None, f"the job ended before {what}:\n{''.join(self.lines)[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)

    def workers(self) -> list[tuple[int, int, str, str]]:
        """(pid, rank, node id, start) of every training worker started so far, in order."""
        found = re.findall(
            r"RayTrainWorker pid=(\d+)\S* train worker (\d+)/2 on node (\w+), (fresh|resuming from \S+)",
            "".join(self.lines),
        )
        return list({int(pid): (int(pid), int(rank), node, start) for pid, rank, node, start in found}.values())

    def finish(self, timeout_s: float = 600) -> str:
        self.process.wait(timeout=timeout_s)
        self.reader.join(timeout=30)
        return "".join(self.lines)

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process.poll() is None:
            self.cluster.run(
                [str(BIN / "ray"), "job", "stop", f"--address={self.cluster.address}", self.id], check=False
            )
            self.process.kill()


def registered(run: Path, step: int) -> bool:
    """Ray Train has registered the checkpoint of `step` (it restores only registered ones:
    state.json on disk comes first)."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f"step_{step:08d}" in snapshot.read_text()


def test_training_survives_a_killed_worker_and_a_lost_node(cluster, build, straight):
    storage, _ = straight
    run = storage / "survivor"
    alive = cluster.alive_nodes()  # now: `ray list nodes` takes seconds, a step a fraction of one
    node_of = {a["node_id"]: n for n in cluster.nodes for a in alive if n.name in a["resources_total"]}
    with JobOutput(
        cluster, "training/train.py", *train_args(build, storage, "survivor", "--set", "run.max_failures=2")
    ) as job:
        job.wait_for(lambda: registered(run, CHECKPOINT_EVERY) and len(job.workers()) == 2, "the first checkpoint")
        os.kill(job.workers()[1][0], signal.SIGKILL)  # one training worker's process
        job.wait_for(lambda: len(job.workers()) == 4, "the worker group's restart")
        restarted_at = int(job.workers()[-1][3].rsplit("_", 1)[1])
        pid, _, node_id, _ = job.workers()[-1]
        job.wait_for(
            lambda: any(r["start_step"] == restarted_at for r in logged(storage, "survivor")),
            "a step of the restarted group",
        )
        cluster.kill_node(node_of[node_id])  # a whole worker node, every process on it
        assert wait_until_dead(pid), "a training worker of the lost node survived it"
        cluster.add_node()  # the replacement the autoscaler would bring
        stdout = job.finish()
    assert job.process.returncode == 0 and "succeeded" in stdout, stdout[-4000:]
    starts = [start for *_, start in job.workers()]
    # two restarts of both workers at least (a third when Ray Train's controller itself fails on
    # the lost node and train.py relaunches the run from its checkpoint)
    assert starts[:2] == ["fresh"] * 2 and len(starts) >= 6 and len(starts) % 2 == 0, starts
    assert all(start.startswith("resuming from ") for start in starts[2:]), starts
    lines = logged(storage, "survivor")
    assert [r["step"] for r in lines] == list(range(1, TRAIN_STEPS + 1))  # each step once
    attempts = [r["start_step"] for r in lines]
    assert attempts == sorted(attempts) and attempts[0] == 0 and restarted_at in attempts, attempts
    reference = {r["step"]: r["loss/total"] for r in logged(storage, "straight")}
    assert [r["loss/total"] for r in lines] == pytest.approx([reference[r["step"]] for r in lines], rel=1e-5)


def submit_prepare(cluster, script: str, *args: str) -> None:
    cluster.submit(
        f"pipelines/{script}",
        *args,
        "--image-size",
        "32",
        "--shard-size",
        "8",
        "--threads-per-task",
        "4",
        "--allow-loopback-urls",
    )


def test_prepare_yfcc15m_and_sharegpt4v_through_ray_job_submit(cluster, tmp_path):
    from tests.build_checks import captions_by_source, check_build
    from tests.corpus_fixtures import write_sharegpt4v_fixture, write_yfcc_fixture

    (tmp_path / "yfcc" / "mirror").mkdir(parents=True)
    with cluster.mirror(tmp_path / "yfcc" / "mirror") as base_url:
        fx = write_yfcc_fixture(tmp_path / "yfcc", base_url, n_photos=4)
        submit_prepare(
            cluster, "prepare_yfcc15m.py", "--joined", str(fx.joined_parquet), "--output", str(tmp_path / "out")
        )
    (build_dir,) = (tmp_path / "out" / "yfcc15m").iterdir()
    assert captions_by_source(check_build(str(build_dir))[1]) == fx.expected_captions
    sg = write_sharegpt4v_fixture(tmp_path / "sharegpt4v", n_records=6)
    submit_prepare(
        cluster,
        "prepare_sharegpt4v.py",
        "--captions",
        str(sg.json_path),
        "--image-root",
        str(sg.image_root),
        "--coco-captions",
        str(sg.coco_captions_json),
        "--validation-records",
        "2",
        "--output",
        str(tmp_path / "out"),
    )
    (val_dir,) = (tmp_path / "out" / "sharegpt4v-val2").iterdir()
    assert captions_by_source(check_build(str(val_dir))[1]) == sg.expected_captions(range(2))


def test_every_node_and_job_uses_loopback_only(cluster):
    nodes = cluster.alive_nodes()
    assert len(nodes) == 3 and {n["node_ip"] for n in nodes} == {"127.0.0.1"}
    code = (
        "import ray; ray.init(); import ray.util; "
        "print('addresses', ray.get_runtime_context().gcs_address, ray.util.get_node_ip_address())"
    )
    stdout = cluster.submit("-c", code)
    (line,) = [x for x in stdout.splitlines() if x.startswith("addresses ")]
    gcs, node_ip = line.split()[1:]
    assert gcs.startswith("127.0.0.1:") and node_ip == "127.0.0.1"


def replicated_zeroshot(source: Path, out: Path, copies: int) -> int:
    """The corpus's zero-shot folder with each image `copies` times under new names (distinct
    inputs for the cache); returns the number of images."""
    n = 0
    for item in source.iterdir():
        if item.is_file():
            (out / item.name).parent.mkdir(parents=True, exist_ok=True)
            (out / item.name).write_bytes(item.read_bytes())
            continue
        for image in item.iterdir():
            for k in range(copies):
                (out / item.name).mkdir(parents=True, exist_ok=True)
                (out / item.name / f"{k:03d}-{image.name}").write_bytes(image.read_bytes())
                n += 1
    return n


def cache_files(cache: Path, suffix: str) -> set[str]:
    return {p.name for p in cache.rglob(f"*{suffix}")}


def test_a_killed_evaluation_reencodes_at_most_one_block_per_encoder(cluster, straight, small_corpus, tmp_path):
    storage, _ = straight
    corpus, _ = small_corpus
    n_images = replicated_zeroshot(corpus.zeroshot_dir, tmp_path / "zeroshot", copies=12)
    cache, encoders, block = tmp_path / "cache", 2, 2
    args = [
        "--checkpoint",
        str(storage / "straight"),
        "--zeroshot",
        str(tmp_path / "zeroshot"),
        "--output",
        str(tmp_path / "report"),
        "--cache",
        str(cache),
        "--num-encoders",
        str(encoders),
        "--cache-block",
        str(block),
        "--batch-size",
        str(block),
    ]
    with JobOutput(cluster, "evaluation/evaluate.py", *args) as job:
        job.wait_for(lambda: len(cache_files(cache, ".npy")) >= 3, "the first blocks")
        driver = subprocess.run(["pgrep", "-f", "^python evaluation/evaluate.py"], capture_output=True, text=True)
        os.kill(int(driver.stdout.split()[0]), signal.SIGKILL)  # the job's driver, mid-pass
        job.finish()
    assert job.process.returncode != 0
    time.sleep(2)  # its actors, owned by the dead driver, are gone
    published, claimed = cache_files(cache, ".npy"), cache_files(cache, ".claim")
    total = -(-n_images // block)
    assert 3 <= len(published) < total and len(claimed) <= encoders, (len(published), claimed)
    stdout = cluster.submit("evaluation/evaluate.py", *args)
    misses = int(re.search(r"embedding cache: (\d+) block hit\(s\), (\d+) block miss", stdout).group(2))
    hits = int(re.search(r"embedding cache: (\d+) block hit", stdout).group(1))
    assert hits == len(published) and cache_files(cache, ".claim") == set()
    assert len(cache_files(cache, ".npy")) == hits + misses
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["zeroshot"]["zeroshot"]["n_images"] == n_images


def test_a_build_survives_a_lost_prepare_node(cluster, mirror, small_corpus, build, tmp_path):
    """A worker node dies while the prepare job downloads (its first shard is staged, the
    others are being fetched on both nodes: the mirror's latency keeps them in flight): Ray retries
    its tasks on the other node, the shard store keeps what was staged, and the build has
    every sample once."""
    from tests.build_checks import check_build

    corpus, tsv = small_corpus
    out, victim = tmp_path / "shards", cluster.nodes[-1]
    (victim_id,) = [n["node_id"] for n in cluster.alive_nodes() if victim.name in n["resources_total"]]
    with JobOutput(
        cluster,
        "pipelines/prepare_cc12m.py",
        "--input",
        str(tsv),
        "--output",
        str(out),
        "--image-size",
        "32",
        "--shard-size",
        "6",
        "--threads-per-task",
        "4",
        "--allow-loopback-urls",
    ) as job:
        job.wait_for(lambda: any(out.glob("cc12m/*/staging/shards/*.tar")), "the first staged shard")
        cluster.kill_node(victim)
        cluster.add_node()
        stdout = job.finish()
    lost = [
        t
        for t in cluster.job_tasks(job.id)
        if t.get("node_id") == victim_id
        and t.get("required_resources", {}).get("CPU", 0) > 0
        and t["state"] != "FINISHED"
    ]
    assert lost, "no task of the build was under way on the node that was killed"
    assert job.process.returncode == 0 and "succeeded" in stdout, stdout[-4000:]
    (build_dir,) = (out / "cc12m").iterdir()
    manifest, metas = check_build(str(build_dir))  # unique keys, every shard intact
    expected = shards.read_manifest(str(build))  # the same input built on an intact cluster
    assert manifest["counts"] == expected["counts"]
    assert sorted(e["sha256"] for e in manifest["shards"]) == sorted(e["sha256"] for e in expected["shards"])
