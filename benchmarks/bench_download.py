"""Downloads against img2dataset: the same URLs, the same latency mirror, one run.

    python -m benchmarks.bench_download [--n-images 8000] [--shard-size 1000] [--threads 16] [--latency-ms 50 200]

The URL list is CC12M's layout (TSV url<TAB>caption, with a header line img2dataset needs
and our reader skips): real photographs (bench_prepare.source_images: crops of skimage's
sample photos, 480-720 px, JPEG q90), 3 % of rows repeating an earlier URL with another
caption (CC12M's duplicate rate), and among the URLs 2 % missing files (404), 1 % truncated
JPEGs, 1 % HTML pages. The loopback mirror answers each request after a latency drawn in
--latency-ms and fails a share of them (3 % 503, 2 % reset connections), each a function of
the URL alone (mirror.ServingProfile), so both tools meet the same hosts.

Both tools store 256 px center crops as JPEG q95 with one process per core (img2dataset's
processes_count, our local Ray instance's shard tasks, one per CPU) of `--threads` download threads each,
timeout 10 s, no retries, 1,000 images per shard (--shard-size: our prepare job's default;
8,000 images make 4 shards a CPU, so that the rate is measured over a run and not over Ray's
and img2dataset's start-up alone, which a 2,000-image run is one third of; img2dataset's distributor
replaces each process after 5 shards, maxtasksperchild=5, a fresh spawn that imports it all
again: with small shards that pause recurs often), and each runs in a fresh process (its start-up
counted):
  img2dataset  img2dataset.download (its multiprocessing distributor, webdataset output);
  ours         pipelines/prepare_cc12m.py (Ray Data on a local Ray instance): header checks,
               dedup of identical images, Sobel edge maps, caption groups, atomic shards.
Figures: wall seconds, images stored and how many of them are distinct (3 % of the rows
repeat a URL: img2dataset fetches and stores that image again under the other caption, ours
fetches it once and stores one sample with both captions, so "distinct images/s" compares the
same delivered content), images/s and images/s per core, CPU seconds per stored
image (busy CPU time of the whole machine from /proc/stat over the run, minus this process,
which serves the mirror: so run it on an otherwise idle machine), the share of wall time
before the mirror saw the first request (start-up and planning), the images/s per core while
requests flow (first to last request: the rate a corpus-scale run sustains, where the fixed
costs vanish), the time after the last request (dedup, publishing, shutdown) and the mean
number of requests in flight while they flow (the thread budget is processes x threads), also
printed for each second of the run. "Sustained" figures are taken over the middle half of the
requests span, away from the ramps at either end: what a corpus-scale run, where start-up and
shutdown vanish, would show. On a virtual machine the host may take CPU time from it (steal,
printed per run): that slows a CPU-bound tool without being its cost, so CPU seconds leave it
out; --repeats alternates the tools so that a drift in the host's load hits both.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bench_prepare import source_images
from pipelines.mirror import LoopbackMirror, ServingProfile, mean_in_flight

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE, IMAGE_SIZE, TIMEOUT_S = 1000, 256, 10
DUPLICATE_ROWS, MISSING, TRUNCATED, HTML = 0.03, 0.02, 0.01, 0.01
PROFILE_503, PROFILE_RESET = 0.03, 0.02


@dataclass
class Run:
    name: str
    wall_s: float
    stored: int
    distinct: int  # distinct images among those stored (img2dataset stores a repeated URL again)
    cpu_s: float
    first_request_s: float
    last_request_s: float
    in_flight: float  # requests being answered, time-averaged over the requests span
    steal: float  # share of CPU time the virtual machine's host took during the run
    timeline: list[float]  # requests in flight per second of the run, from its start
    sustained_rate: float  # images/s in the middle half of the requests span
    sustained_cpu_s: float  # CPU seconds per image there


def write_mirror(root: Path, n_images: int, seed: int) -> list[str]:
    """Photos and bad files under `root`; returns their paths in URL-list order."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    photos = []
    for i, blob in enumerate(source_images(n_images, seed)):
        (root / f"{i:06d}.jpg").write_bytes(blob)
        photos.append(f"{i:06d}.jpg")
    names = list(photos)
    for kind, share in (("missing", MISSING), ("truncated", TRUNCATED), ("html", HTML)):
        for j in range(max(1, round(share * n_images))):
            name = f"{kind}-{j:04d}.jpg"
            if kind == "truncated":
                blob = (root / photos[j]).read_bytes()  # names holds bad files too by now
                (root / name).write_bytes(blob[: len(blob) // 2])
            elif kind == "html":
                (root / name).write_bytes(b"<html><body>moved</body></html>")
            names.insert(int(rng.integers(0, len(names))), name)
    return names


def write_url_list(path: Path, base_url: str, names: list[str], seed: int) -> int:
    """The TSV (header first); returns its row count."""
    rng = np.random.default_rng(seed + 1)
    rows = [(f"{base_url}/{n}", f"a photograph number {i} of the series") for i, n in enumerate(names)]
    for k in range(round(DUPLICATE_ROWS * len(rows))):
        url = rows[int(rng.integers(0, len(rows)))][0]
        rows.insert(int(rng.integers(0, len(rows))), (url, f"another caption {k} of the same picture"))
    path.write_text("url\tcaption\n" + "".join(f"{u}\t{c}\n" for u, c in rows))
    return len(rows)


def busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq; not
    steal, the time a virtual machine's host ran someone else)."""
    user, nice, system, _idle, _iowait, irq, softirq = cpu_fields()[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of the machine's CPU time its host took (steal) between two /proc/stat reads."""
    total = sum(after[:8]) - sum(before[:8])
    return (after[7] - before[7]) / max(total, 1)


def cpu_fields() -> list[int]:
    return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def img2dataset_command(tsv: Path, out: Path, processes: int, threads: int, shard_size: int = SHARD_SIZE) -> list[str]:
    kwargs = {
        "url_list": str(tsv),
        "output_folder": str(out),
        "input_format": "tsv",
        "url_col": "url",
        "caption_col": "caption",
        "output_format": "webdataset",
        "image_size": IMAGE_SIZE,
        "resize_mode": "center_crop",
        "encode_quality": 95,
        "processes_count": processes,
        "thread_count": threads,
        "timeout": TIMEOUT_S,
        "retries": 0,
        "number_sample_per_shard": shard_size,
        "distributor": "multiprocessing",
        "min_image_size": 32,
        "enable_wandb": False,
    }
    code = f"from img2dataset import download; download(**{kwargs!r})"
    return [sys.executable, "-c", code]


def ours_command(tsv: Path, out: Path, processes: int, threads: int, shard_size: int = SHARD_SIZE) -> list[str]:
    return [
        sys.executable,
        str(REPO / "pipelines" / "prepare_cc12m.py"),
        "--input",
        str(tsv),
        "--output",
        str(out),
        "--image-size",
        str(IMAGE_SIZE),
        "--shard-size",
        str(shard_size),
        "--threads-per-task",
        str(threads),
        "--timeout",
        str(TIMEOUT_S),
        "--retries",
        "0",
        "--allow-loopback-urls",
    ]  # a local Ray instance on every core: `processes` actors


def img2dataset_stored(out: Path) -> tuple[int, int]:
    """(samples stored, distinct URLs among them): a URL listed twice with two captions is
    fetched and stored twice."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(out.glob("*.parquet")), columns=["url", "status"])
    stored = table.filter(pc.equal(table["status"], "success"))
    return stored.num_rows, len(pc.unique(stored["url"]))


def ours_stored(out: Path) -> tuple[int, int]:
    """(samples stored, the same): one sample per distinct image, holding all its captions."""
    manifests = list(out.glob("*/*/manifest.json"))
    written = sum(json.loads(p.read_text())["counts"]["written"] for p in manifests)
    return written, written


class CpuSampler:
    """The machine's busy CPU seconds (less this process's: the mirror), sampled every
    `every_s` from a thread, so that figures can be taken over part of a run."""

    def __init__(self, every_s: float = 0.25):
        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), busy_cpu_s() - own_cpu_s()))
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_between(self, start: float, end: float) -> float:
        times, cpu = np.array(self.samples).T
        return float(np.interp(end, times, cpu) - np.interp(start, times, cpu))


def run_tool(
    name: str, command: list[str], stored, mirror_root: Path, tsv_for, out: Path, profile: ServingProfile
) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_ADDRESS": "",
    }
    with LoopbackMirror(mirror_root, profile=profile) as mirror:
        tsv = tsv_for(mirror.base_url)
        fields0, start = cpu_fields(), time.monotonic()
        with CpuSampler() as sampler, open(out.parent / f"{name}.log", "w") as log:  # its console
            done = subprocess.run(command(tsv, out), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
            wall = time.monotonic() - start
        steal = steal_share(fields0, cpu_fields())
        first = (mirror.first_request_s or start + wall) - start
        last = (mirror.last_request_s or start + wall) - start
        events = [(t - start, change) for t, change in mirror.request_events]
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{(out.parent / f'{name}.log').read_text()[-3000:]}")
    n_stored, n_distinct = stored(out)
    timeline = [mean_in_flight(events, s, s + 1.0) for s in range(math.ceil(wall))]
    # The middle half of the requests span: the rate a long run sustains, away from the ramps
    # at either end. Images there: requests answered there, times the run's stored share.
    mid = (first + 0.25 * (last - first), first + 0.75 * (last - first))
    answered = sum(1 for t, change in events if change < 0 and mid[0] <= t < mid[1])
    n_answered = max(1, sum(1 for _, change in events if change < 0))
    mid_images = answered * n_stored / n_answered
    return Run(
        name,
        wall,
        n_stored,
        n_distinct,
        sampler.cpu_between(start, start + wall),
        first,
        last,
        mean_in_flight(events, first, last),
        steal,
        timeline,
        mid_images / max(mid[1] - mid[0], 1e-9),
        sampler.cpu_between(start + mid[0], start + mid[1]) / max(mid_images, 1e-9),
    )


def report(runs: list[Run], cores: int) -> None:
    print(
        f"{'tool':<12} {'wall s':>7} {'stored':>7} {'distinct':>8} {'img/s':>7} {'img/s/core':>10} "
        f"{'CPU ms/img':>10} {'before 1st request':>19} {'requests span':>13} {'img/s/core in span':>18} "
        f"{'after last request':>18} {'in flight':>9} {'steal':>6}"
    )
    for r in runs:
        rate, span = r.stored / r.wall_s, max(r.last_request_s - r.first_request_s, 1e-9)
        print(
            f"{r.name:<12} {r.wall_s:7.1f} {r.stored:7d} {r.distinct:8d} {rate:7.1f} {rate / cores:10.1f} "
            f"{1e3 * r.cpu_s / max(r.stored, 1):10.1f} {r.first_request_s:7.1f} s "
            f"({r.first_request_s / r.wall_s:5.1%}) "
            f"{span:11.1f} s {r.stored / span / cores:18.1f} {r.wall_s - r.last_request_s:16.1f} s "
            f"{r.in_flight:9.1f} {r.steal:6.1%}"
        )
    print(f"sustained (middle half of the requests span): {'img/s/core':>10} {'CPU ms/img':>10}")
    for r in runs:
        print(f"{r.name:<12} {'':>34} {r.sustained_rate / cores:10.1f} {1e3 * r.sustained_cpu_s:10.1f}")
    for r in runs:  # where the requests in flight fall short of the thread budget
        print(f"{r.name:<12} requests in flight, each second: " + " ".join(f"{x:.0f}" for x in r.timeline))


def ratios(base: Run, ours: Run) -> dict[str, float]:
    """ours / img2dataset: images/s (stored, and distinct) and CPU per image over the whole run, images/s while
    requests flow, and both in the middle half of the requests span."""

    def span_rate(r: Run) -> float:
        return r.stored / max(r.last_request_s - r.first_request_s, 1e-9)

    return {
        "images/s": (ours.stored / ours.wall_s) / (base.stored / base.wall_s),
        "distinct images/s": (ours.distinct / ours.wall_s) / (base.distinct / base.wall_s),
        "while requests flow": span_rate(ours) / span_rate(base),
        "CPU per image": (ours.cpu_s / ours.stored) / (base.cpu_s / base.stored),
        "sustained images/s": ours.sustained_rate / base.sustained_rate,
        "sustained CPU per image": ours.sustained_cpu_s / base.sustained_cpu_s,
    }


def report_ratios(pairs: list[tuple[Run, Run]]) -> None:
    """Each pair's ratios, and with several pairs their mean and standard error."""
    table = [ratios(base, ours) for base, ours in pairs]
    for i, row in enumerate(table):
        print(f"ours / img2dataset (pair {i + 1}): " + ", ".join(f"{k} x{v:.2f}" for k, v in row.items()))
    if len(table) > 1:
        stats = {k: np.array([row[k] for row in table]) for k in table[0]}
        print(
            f"ours / img2dataset over {len(table)} pairs, mean ± standard error: "
            + ", ".join(f"{k} x{v.mean():.2f} ± {v.std(ddof=1) / len(v) ** 0.5:.2f}" for k, v in stats.items())
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out/download")
    p.add_argument("--n-images", type=int, default=8000)
    p.add_argument("--threads", type=int, default=16, help="download threads per process")
    p.add_argument("--latency-ms", type=float, nargs=2, default=(50.0, 200.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--shard-size",
        type=int,
        default=SHARD_SIZE,
        help="images per shard (img2dataset restarts each process after 5 shards)",
    )
    p.add_argument("--repeats", type=int, default=1, help="runs of each tool, alternating")
    p.add_argument(
        "--tools",
        nargs="+",
        choices=("img2dataset", "ours"),
        default=("img2dataset", "ours"),
        help="run only some (the ratio needs both)",
    )
    args = p.parse_args(argv)
    work, cores = Path(args.workdir).resolve(), os.cpu_count() or 1
    names = write_mirror(work / "mirror", args.n_images, args.seed)
    profile = ServingProfile(
        latency_s=(args.latency_ms[0] / 1e3, args.latency_ms[1] / 1e3),
        error_503=PROFILE_503,
        reset=PROFILE_RESET,
        seed=args.seed,
    )

    def tsv_for(base_url: str) -> Path:
        n_rows = write_url_list(work / "urls.tsv", base_url, names, args.seed)
        print(
            f"{n_rows} rows, {len(names)} URLs, latency {args.latency_ms[0]:.0f}-{args.latency_ms[1]:.0f} ms, "
            f"{cores} processes x {args.threads} threads",
            flush=True,
        )
        return work / "urls.tsv"

    runs, pairs = [], []
    for _ in range(args.repeats):  # alternating, so a drift in the machine's speed hits both
        pair = []
        for name, command, stored in (
            ("img2dataset", img2dataset_command, img2dataset_stored),
            ("ours", ours_command, ours_stored),
        ):
            if name not in args.tools:
                continue

            def bound(tsv, out, command=command):
                return command(tsv, out, cores, args.threads, args.shard_size)

            pair.append(run_tool(name, bound, stored, work / "mirror", tsv_for, work / name, profile))
        runs += pair
        if len(pair) == 2:
            pairs.append(tuple(pair))
    report(runs, cores)
    report_ratios(pairs)


if __name__ == "__main__":
    main()
