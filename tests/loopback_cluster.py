"""A real multi-node Ray cluster on one machine: a head and worker nodes started with
`ray start` (token auth, as the README documents), all inside one network namespace whose only
interface is loopback, so that no node can leave 127.0.0.1 (Ray moves a node to the machine's
routable address otherwise, docs/architecture.md §10) and nothing the cluster runs can
reach another machine.

The namespace is held by one `sleep` process made with `unshare --net`; every process of the
cluster (nodes, the loopback mirror the prepare job downloads from, `ray job submit`) enters it
with `nsenter --net`. Files and processes are shared with the test, so a test reads the jobs'
outputs directly and kills a node by signalling its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines import ray_setup

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD_PORT, GCS_PORT = 8265, 6379  # Ray's defaults: the namespace has nothing else on them


class NamespaceUnavailable(RuntimeError):
    pass


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None


def cluster_env(home: Path) -> dict:
    # One token for every node and client, from the environment as KubeRay passes it (infra/README.md)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "HOME": str(home),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        **ray_setup.OFFLINE_ENV,
        # the GCS declares a silent node dead after ~3 s, not Ray's default ~30 s
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "1000",
        "RAY_health_check_failure_threshold": "3",
        # every worker's own lines in the job's console (the tests read them), not Ray's
        # "[repeated 2x across cluster]" summaries of lines that differ only in numbers
        "RAY_DEDUP_LOGS": "0",
    }
    for key in ("RAY_ADDRESS", ray_setup.ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR):
        env.pop(key, None)  # a real cluster: nodes may join
    return env


def descendants(pid: int) -> list[int]:
    """Every living process below `pid` (from /proc: each process's parent)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_until_dead(pid: int, timeout_s: float = 30) -> bool:
    """SIGKILL is delivered asynchronously: True once `pid` is gone or a zombie."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


class LoopbackCluster:
    def __init__(self, workdir: Path):
        self.workdir, self.nodes, self.holder, self.started_workers = workdir, [], None, 0
        self.temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # Ray's socket paths stay < 108 bytes
        self.env = cluster_env(workdir / "home")
        (workdir / "home").mkdir(parents=True, exist_ok=True)
        self.address = f"http://127.0.0.1:{DASHBOARD_PORT}"

    # ------------------------------------------------------------ the namespace
    def make_namespace(self) -> None:
        if shutil.which("unshare") is None or shutil.which("nsenter") is None:
            raise NamespaceUnavailable("unshare/nsenter (util-linux) are not installed")
        self.holder = subprocess.Popen(
            ["unshare", "--net", "sh", "-c", "ip link set lo up && exec sleep 100000"],
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.holder.poll() is not None:
                raise NamespaceUnavailable(
                    f"unshare --net failed (needs root or CAP_SYS_ADMIN): {self.holder.stderr.read().strip()}"
                )
            if os.readlink(f"/proc/{self.holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                time.sleep(0.05)  # not unshared yet: entering it now would enter the machine's
                continue
            probe = subprocess.run(self.prefix() + ["ip", "-o", "link", "show"], capture_output=True, text=True)
            links = probe.stdout.splitlines()
            assert len(links) == 1 and links[0].startswith("1: lo:"), f"not a loopback-only namespace: {links}"
            if ",UP," in links[0]:
                return
            time.sleep(0.05)
        raise NamespaceUnavailable("the network namespace never brought loopback up")

    def prefix(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--"]

    def popen(self, args: list[str], log: Path) -> subprocess.Popen:
        """A process inside the namespace, in a process group of its own."""
        return subprocess.Popen(
            self.prefix() + args, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
        )

    def run(self, args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(self.prefix() + args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"{args[:3]} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    # ------------------------------------------------------------ nodes
    def start(self, worker_nodes: int = 2, cpus_per_node: int = 2) -> LoopbackCluster:
        """A head with no CPUs (it runs the job drivers, as on KubeRay) and `worker_nodes`
        nodes of `cpus_per_node` logical CPUs each."""
        self.make_namespace()
        self.start_node(
            "head",
            [
                "--head",
                f"--port={GCS_PORT}",
                "--num-cpus=0",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={DASHBOARD_PORT}",
            ],
        )
        for _ in range(worker_nodes):
            self.add_node(cpus_per_node)
        self.wait_for_nodes(worker_nodes + 1)
        return self

    def add_node(self, cpus: int = 2) -> Node:
        self.started_workers += 1
        name = f"worker{self.started_workers}"  # a replacement gets a new name, log and temp dir
        return self.start_node(
            name, [f"--address=127.0.0.1:{GCS_PORT}", f"--num-cpus={cpus}", f"--resources={json.dumps({name: 1})}"]
        )

    def start_node(self, name: str, flags: list[str]) -> Node:
        log = self.workdir / f"{name}.log"
        # A temp dir per node, as separate machines have: nodes sharing one would share the
        # runtime-env folder, and one node's cleanup would delete a job's working directory
        # under another node's running driver.
        process = self.popen(
            [
                str(BIN / "ray"),
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                "--min-worker-port=0",
                "--max-worker-port=0",
                f"--temp-dir={self.temp_dir}/{name}",
                *flags,
            ],
            log,
        )
        node = Node(name, process, log)
        deadline = time.monotonic() + 180
        while "will now block forever" not in log.read_text():
            assert node.alive(), f"ray start ({name}) exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"ray start ({name}) never came up:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        self.nodes.append(node)
        return node

    def alive_nodes(self) -> list[dict]:
        out = self.run(
            [
                str(BIN / "ray"),
                "list",
                "nodes",
                f"--address={self.address}",
                "--format=json",
                "--filter",
                "state=ALIVE",
            ],
            timeout=120,
        ).stdout
        return json.loads(out)

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == count:
                return nodes
            assert time.monotonic() < deadline, f"{len(nodes)} nodes alive, expected {count}"
            time.sleep(1)

    def kill_node(self, node: Node) -> None:
        """A node lost at once (preemption): SIGKILL to every process it started, its Ray
        workers included (they run in sessions of their own, outside the node's group)."""
        for pid in [*descendants(node.process.pid), node.process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=30)
        self.nodes.remove(node)

    @contextlib.contextmanager
    def mirror(self, root: Path, port: int = 0, latency_ms: tuple[float, float] = (0, 0)):
        """pipelines/mirror.py serving `root` inside the namespace, each answer after a latency
        drawn in `latency_ms`; yields its base URL."""
        log = self.workdir / f"mirror-{port}-{time.monotonic_ns()}.log"
        process = self.popen(
            [
                sys.executable,
                "-c",
                "import sys; sys.path.insert(0, sys.argv[1]); from pipelines import mirror; mirror.main(sys.argv[2:])",
                str(ROOT),
                "--root",
                str(root),
                "--port",
                str(port),
                "--latency-ms",
                *map(str, latency_ms),
            ],
            log,
        )
        deadline = time.monotonic() + 60
        while "http://" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        try:
            yield log.read_text().split()[0]
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    # ------------------------------------------------------------ jobs
    def submit_command(self, script: str, *args: str, submission_id: str | None = None) -> list[str]:
        """`ray job submit --working-dir .` as the README tells users."""
        return [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={self.address}",
            f"--working-dir={ROOT}",
            *([f"--submission-id={submission_id}"] if submission_id else []),
            "--",
            "python",
            script,
            *args,
        ]

    def submit(self, script: str, *args: str, submission_id: str | None = None, timeout: float = 600) -> str:
        result = self.run(self.submit_command(script, *args, submission_id=submission_id), timeout=timeout)
        assert "succeeded" in result.stdout, result.stdout[-4000:]
        return result.stdout

    def job_tasks(self, submission_id: str) -> list[dict]:
        """The State API's record of every task a job ran (its name, type and node)."""
        jobs = json.loads(
            self.run(
                [str(BIN / "ray"), "list", "jobs", f"--address={self.address}", "--format=json", "--detail"]
            ).stdout
        )
        (job_id,) = [j["job_id"] for j in jobs if j.get("submission_id") == submission_id]
        return json.loads(
            self.run(
                [
                    str(BIN / "ray"),
                    "list",
                    "tasks",
                    f"--address={self.address}",
                    "--format=json",
                    "--detail",
                    "--limit=10000",
                    "--filter",
                    f"job_id={job_id}",
                ]
            ).stdout
        )

    def stop(self) -> None:
        """Every process the cluster started, at once (a graceful `ray stop` takes ~30 s):
        each node's process group holds its raylet, its agents and the workers it started."""
        for node in list(self.nodes):
            self.kill_node(node)
        if self.holder is not None and self.holder.poll() is None:
            os.killpg(self.holder.pid, signal.SIGKILL)
            self.holder.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
