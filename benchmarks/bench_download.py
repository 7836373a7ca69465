"""Downloads against img2dataset: the same URLs, the same latency mirror, one run.

    python -m benchmarks.bench_download [--n-images 2000] [--threads 16] [--latency-ms 50 200]

The URL list is CC12M's layout (TSV url<TAB>caption, with a header line img2dataset needs
and our reader skips): real photographs (bench_prepare.source_images: crops of skimage's
sample photos, 480-720 px, JPEG q90), 3 % of rows repeating an earlier URL with another
caption (CC12M's duplicate rate), and among the URLs 2 % missing files (404), 1 % truncated
JPEGs, 1 % HTML pages. The loopback mirror answers each request after a latency drawn in
--latency-ms and fails a share of them (3 % 503, 2 % reset connections), each a function of
the URL alone (mirror.ServingProfile), so both tools meet the same hosts.

Both tools store 256 px center crops as JPEG q95 with one process per core (img2dataset's
processes_count, our local Ray instance's shard tasks, one per CPU) of `--threads` download threads each,
timeout 10 s, no retries, 250 images per shard, and each runs in a fresh process (its start-up
counted):
  img2dataset  img2dataset.download (its multiprocessing distributor, webdataset output);
  ours         pipelines/prepare_cc12m.py (Ray Data on a local Ray instance): header checks,
               dedup of identical images, Sobel edge maps, caption groups, atomic shards.
Figures: wall seconds, images stored, images/s and images/s per core, CPU seconds per stored
image (busy CPU time of the whole machine from /proc/stat over the run, minus this process,
which serves the mirror: so run it on an otherwise idle machine), the share of wall time
before the mirror saw the first request (start-up and planning), the images/s per core while
requests flow (first to last request: the rate a corpus-scale run sustains, where the fixed
costs vanish) and the time after the last request (dedup, publishing, shutdown).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.bench_prepare import source_images
from pipelines.mirror import LoopbackMirror, ServingProfile

REPO = Path(__file__).resolve().parents[1]
SHARD_SIZE, IMAGE_SIZE, TIMEOUT_S = 250, 256, 10
DUPLICATE_ROWS, MISSING, TRUNCATED, HTML = 0.03, 0.02, 0.01, 0.01
PROFILE_503, PROFILE_RESET = 0.03, 0.02


@dataclass
class Run:
    name: str
    wall_s: float
    stored: int
    cpu_s: float
    first_request_s: float
    last_request_s: float


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
                (root / name).write_bytes(blob[:len(blob) // 2])
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
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def img2dataset_command(tsv: Path, out: Path, processes: int, threads: int) -> list[str]:
    kwargs = {"url_list": str(tsv), "output_folder": str(out), "input_format": "tsv",
              "url_col": "url", "caption_col": "caption", "output_format": "webdataset",
              "image_size": IMAGE_SIZE, "resize_mode": "center_crop", "encode_quality": 95,
              "processes_count": processes, "thread_count": threads, "timeout": TIMEOUT_S,
              "retries": 0, "number_sample_per_shard": SHARD_SIZE, "distributor": "multiprocessing",
              "min_image_size": 32, "enable_wandb": False}
    code = f"from img2dataset import download; download(**{kwargs!r})"
    return [sys.executable, "-c", code]


def ours_command(tsv: Path, out: Path, processes: int, threads: int) -> list[str]:
    return [sys.executable, str(REPO / "pipelines" / "prepare_cc12m.py"), "--input", str(tsv),
            "--output", str(out), "--image-size", str(IMAGE_SIZE), "--shard-size", str(SHARD_SIZE),
            "--threads-per-task", str(threads), "--timeout", str(TIMEOUT_S), "--retries", "0",
            "--allow-loopback-urls"]  # a local Ray instance on every core: `processes` actors


def img2dataset_stored(out: Path) -> int:
    return sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))


def ours_stored(out: Path) -> int:
    manifests = list(out.glob("*/*/manifest.json"))
    return sum(json.loads(p.read_text())["counts"]["written"] for p in manifests)


def run_tool(name: str, command: list[str], stored, mirror_root: Path, tsv_for, out: Path,
             profile: ServingProfile) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": ""}
    with LoopbackMirror(mirror_root, profile=profile) as mirror:
        tsv = tsv_for(mirror.base_url)
        cpu0, own0, start = busy_cpu_s(), own_cpu_s(), time.monotonic()
        with open(out.parent / f"{name}.log", "w") as log:  # the tool's console, for its stage times
            done = subprocess.run(command(tsv, out), env=env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, text=True)
        wall = time.monotonic() - start
        cpu = busy_cpu_s() - cpu0 - (own_cpu_s() - own0)
        first = (mirror.first_request_s or start + wall) - start
        last = (mirror.last_request_s or start + wall) - start
    if done.returncode:
        raise SystemExit(f"{name} failed ({done.returncode}):\n{(out.parent / f'{name}.log').read_text()[-3000:]}")
    return Run(name, wall, stored(out), cpu, first, last)


def report(runs: list[Run], cores: int) -> None:
    print(f"{'tool':<12} {'wall s':>7} {'stored':>7} {'img/s':>7} {'img/s/core':>10} "
          f"{'CPU ms/img':>10} {'before 1st request':>19} {'requests span':>13} {'img/s/core in span':>18} "
          f"{'after last request':>18}")
    for r in runs:
        rate, span = r.stored / r.wall_s, max(r.last_request_s - r.first_request_s, 1e-9)
        print(f"{r.name:<12} {r.wall_s:7.1f} {r.stored:7d} {rate:7.1f} {rate / cores:10.1f} "
              f"{1e3 * r.cpu_s / max(r.stored, 1):10.1f} {r.first_request_s:7.1f} s ({r.first_request_s / r.wall_s:5.1%}) "
              f"{span:11.1f} s {r.stored / span / cores:18.1f} {r.wall_s - r.last_request_s:16.1f} s")
    if len(runs) < 2:
        return
    base, ours = runs
    span_rate = [r.stored / max(r.last_request_s - r.first_request_s, 1e-9) for r in runs]
    print(f"ours / img2dataset: images/s x{(ours.stored / ours.wall_s) / (base.stored / base.wall_s):.2f} "
          f"(while requests flow x{span_rate[1] / span_rate[0]:.2f}), "
          f"CPU per image x{(ours.cpu_s / ours.stored) / (base.cpu_s / base.stored):.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out/download")
    p.add_argument("--n-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=16, help="download threads per process")
    p.add_argument("--latency-ms", type=float, nargs=2, default=(50.0, 200.0))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", nargs="+", choices=("img2dataset", "ours"), default=("img2dataset", "ours"),
                   help="run only some (the ratio needs both)")
    args = p.parse_args(argv)
    work, cores = Path(args.workdir).resolve(), os.cpu_count() or 1
    names = write_mirror(work / "mirror", args.n_images, args.seed)
    profile = ServingProfile(latency_s=(args.latency_ms[0] / 1e3, args.latency_ms[1] / 1e3),
                             error_503=PROFILE_503, reset=PROFILE_RESET, seed=args.seed)

    def tsv_for(base_url: str) -> Path:
        n_rows = write_url_list(work / "urls.tsv", base_url, names, args.seed)
        print(f"{n_rows} rows, {len(names)} URLs, latency {args.latency_ms[0]:.0f}-{args.latency_ms[1]:.0f} ms, "
              f"{cores} processes x {args.threads} threads", flush=True)
        return work / "urls.tsv"

    runs = []
    for name, command, stored in (("img2dataset", img2dataset_command, img2dataset_stored),
                                  ("ours", ours_command, ours_stored)):
        if name not in args.tools:
            continue
        def bound(tsv, out, command=command):
            return command(tsv, out, cores, args.threads)
        runs.append(run_tool(name, bound, stored, work / "mirror", tsv_for, work / name, profile))
    report(runs, cores)


if __name__ == "__main__":
    main()
