"""The planning stages of a prepare job alone (no downloads), at CC12M's scale: TSV rows ->
caption groups -> shard specs, on synthetic TSVs in CC12M's layout.

    python benchmarks/bench_planning.py [--rows 1000000 4000000 12000000] [--baseline]
                                        [--build-images 300 [--build-variant baseline]]

Each TSV holds N `url<TAB>caption` lines: about 3 % of them repeat the URL of an earlier line
with another caption (CC12M's rate is a few percent), about 0.5 % are malformed (no tab,
three fields, an ftp URL, an empty caption) and 0.05 % are not UTF-8. Per size it prints:
  wall    seconds from the reader's dataset to the forced shard specs (`cc12m.read_tsv_rows`,
          `build.plan_caption_groups`, `build.plan_shards`, then the specs counted), after a
          warm-up run that starts Ray's workers;
  rss     peak resident memory of this (the driver) process, sampled every 0.1 s from
          /proc/self/statm, and its rise over the run's start;
  store   peak bytes held in Ray's object store (plasma `object_store_bytes_used`, summed
          over nodes by the raylet's FormatGlobalMemoryInfo, as `ray memory --stats-only`
          prints it), sampled every 0.5 s, plus what was spilled to disk meanwhile;
  slope   the scaling exponent: least-squares slope of log(wall) against log(rows).
--baseline also runs the planning code as it was before it was spread over every CPU (one
parsing actor, one grouping actor, a shuffle to count reject reasons, a pass to find the
shard ids), and checks that both give byte-identical shard specs.
--build-images N first runs a whole small prepare job (N demo images on a loopback mirror,
on cold Ray workers, with the current or the baseline planning) and prints its fixed costs:
Ray's start-up, then the time of each of build.py's stages (plan, download, dedup, publish).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from pipelines import build, cc12m, text_input

DUPLICATE_SHARE = 0.03
MALFORMED_SHARE = 0.005
NON_UTF8_SHARE = 0.0005
WARMUP_ROWS = 20_000
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


# --- synthetic CC12M-layout TSVs ---------------------------------------------------------


def synthetic_lines(n_rows: int, seed: int) -> list[bytes]:
    """n_rows TSV lines (bytes, newline-terminated) in CC12M's layout, see the docstring."""
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(4000)]
    urls, lines = [], []
    for i in range(n_rows):
        caption = " ".join(rng.choices(words, k=rng.randint(4, 24)))
        draw = rng.random()
        if draw < MALFORMED_SHARE:
            lines.append(malformed_line(i, caption, rng))
            continue
        if draw < MALFORMED_SHARE + DUPLICATE_SHARE and urls:
            url = urls[rng.randrange(len(urls))]  # an earlier image, another caption
        else:
            url = f"https://img{i % 97}.example.com/photos/{i:09d}/{rng.getrandbits(40):010x}.jpg"
            urls.append(url)
        line = f"{url}\t{caption}\n".encode("utf-8")
        if draw > 1 - NON_UTF8_SHARE:
            line = f"{url}\tcaf\xe9 {caption}\n".encode("latin-1")  # a Latin-1 byte
        lines.append(line)
    return lines


def malformed_line(i: int, caption: str, rng: random.Random) -> bytes:
    """A line parse_tsv_line rejects: no tab, three fields, a non-HTTP URL, no caption."""
    url = f"https://img0.example.com/bad/{i:09d}.jpg"
    return (
        rng.choice([f"{url} {caption}", f"{url}\t{caption}\textra", f"ftp://x/{i}\t{caption}", f"{url}\t   "]).encode(
            "utf-8"
        )
        + b"\n"
    )


def write_tsv(workdir: Path, n_rows: int, seed: int = 0) -> Path:
    """The synthetic TSV of n_rows lines, written once per (size, seed) and reused."""
    path = workdir / f"planning-{n_rows}-{seed}.tsv"
    if not path.exists():
        start = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.writelines(synthetic_lines(n_rows, seed))
        tmp.rename(path)
        print(f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    return path


# --- the planning code before the change (for --baseline) --------------------------------


def baseline_read_tsv_rows(uris: list[str], rules, origin: str):
    """The reader as it was: one actor parses every line."""
    import ray

    return text_input.read_text_lines(uris).map_batches(
        cc12m.ParseTsvRows,
        fn_constructor_args=(rules, origin),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )


def baseline_plan_caption_groups(rows, params: build.BuildParams):
    """Grouping as it was: a groupby to count reasons, then one actor groups every bucket."""
    import ray
    from ray.data.expressions import col

    rows = rows.materialize()
    n_buckets = max(1, math.ceil(rows.count() / build.ROWS_PER_BUCKET))
    counted = rows.groupby("reason", num_partitions=1).count().take_all()
    reasons = Counter({r["reason"]: r["count()"] for r in counted})
    kept = rows.filter(expr=col("reason") == "").map_batches(
        build.add_buckets, fn_kwargs={"n_buckets": n_buckets}, batch_format="numpy"
    )
    groups = kept.groupby("bucket", num_partitions=n_buckets).map_groups(
        build.GroupBucket,
        fn_constructor_args=(params.caption_rules,),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
    )
    return groups.materialize(), reasons


def baseline_plan_shards(groups, params: build.BuildParams):
    """Shard specs as they were: the assigned groups materialised, a pass to find the
    non-empty shard ids, then renumbering and packing (lazy)."""
    n_groups = groups.count()
    num_shards = max(1, math.ceil(n_groups / params.shard_size))
    assigned = groups.map_batches(
        build.assign_shards, fn_kwargs={"num_shards": num_shards}, batch_format="numpy"
    ).materialize()
    buckets = sorted(int(i) for i in assigned.unique("shard_id")) if n_groups else []
    dense = {bucket: i for i, bucket in enumerate(buckets)}
    renumbered = assigned.map_batches(build.renumber_shards, fn_kwargs={"dense": dense}, batch_format="numpy")
    specs = renumbered.groupby("shard_id", num_partitions=min(num_shards, build.MAX_SHUFFLE_PARTITIONS))
    return specs.map_groups(build.pack_shard, batch_format="numpy"), list(range(len(buckets)))


BASELINE = {
    "read_tsv_rows": baseline_read_tsv_rows,
    "plan_caption_groups": baseline_plan_caption_groups,
    "plan_shards": baseline_plan_shards,
}


BASELINE_OR_CURRENT = ("baseline", "current")


@contextlib.contextmanager
def planning_variant(variant: str):
    """build.py's planning functions replaced by the baseline's while the block runs."""
    replaced = BASELINE if variant == "baseline" else {}
    saved = {name: getattr(build, name) for name in replaced}
    for name, fn in replaced.items():
        setattr(build, name, fn)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(build, name, fn)


def tsv_reader(tsv: Path, params: build.BuildParams):
    return lambda: cc12m.read_tsv_rows([str(tsv)], params.caption_rules, params.corpus)


def plan(read_rows, params: build.BuildParams):
    """(specs, shard count, group count, reasons) from build.py's planning functions."""
    rows = read_rows()
    groups, reasons = build.plan_caption_groups(rows, params)
    n_groups = groups.count()
    specs, shard_ids = build.plan_shards(groups, params)
    return specs, len(shard_ids), n_groups, reasons


# --- measuring ---------------------------------------------------------------------------


class PeakSampler:
    """Peak driver RSS and object-store use while a `with` block runs (a sampling thread)."""

    def __init__(self, rss_every_s: float = 0.1, store_every_s: float = 0.5):
        import ray
        from ray._private.internal_api import get_state_from_address

        self.state = get_state_from_address(ray.get_runtime_context().gcs_address)
        self.rss_every_s, self.store_every_s = rss_every_s, store_every_s
        self.start_rss = self.peak_rss = driver_rss()
        self.start_store, self.start_spilled = self.store_bytes()
        self.peak_store, self.spilled = self.start_store, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def store_bytes(self) -> tuple[int, int]:
        """(bytes in the object store now, bytes spilled so far) across the cluster."""
        from ray._private.internal_api import get_memory_info_reply

        stats = get_memory_info_reply(self.state).store_stats
        return stats.object_store_bytes_used, stats.spilled_bytes_total

    def _run(self) -> None:
        next_store = 0.0
        while not self._stop.wait(self.rss_every_s):
            self.peak_rss = max(self.peak_rss, driver_rss())
            if time.monotonic() >= next_store:
                used, spilled = self.store_bytes()
                self.peak_store = max(self.peak_store, used)
                self.spilled = spilled - self.start_spilled
                next_store = time.monotonic() + self.store_every_s

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, driver_rss())


def driver_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_BYTES


def spec_digest(specs) -> str:
    """sha256 over (shard id, packed groups) of every spec, in shard order: hashed on the
    workers, so only one short row per shard reaches the driver."""

    def digest(batch: dict) -> dict:
        return {
            "shard_id": batch["shard_id"],
            "sha": np.array([hashlib.sha256(g.encode("utf-8")).hexdigest() for g in batch["groups"]], dtype=object),
        }

    rows = sorted((int(r["shard_id"]), r["sha"]) for r in specs.map_batches(digest, batch_format="numpy").iter_rows())
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def run_once(variant: str, read_rows, params: build.BuildParams, check: bool) -> dict:
    """Plan one corpus (`read_rows()`: its caption-row dataset) with one variant and force the
    specs; returns the figures (or the error that stopped it, after how long)."""
    with PeakSampler() as peaks:
        start = time.perf_counter()
        try:
            with planning_variant(variant), build.sort_shuffle():  # as run_build plans
                specs, n_shards, n_groups, reasons = plan(read_rows, params)
                n_specs = specs.count()
        except Exception as e:  # noqa: BLE001  (the baseline fails at some sizes: report it)
            return {"variant": variant, "wall_s": time.perf_counter() - start, "error": error_line(e)}
        wall = time.perf_counter() - start
    assert n_specs == n_shards, (n_specs, n_shards)
    return {
        "variant": variant,
        "wall_s": wall,
        "groups": n_groups,
        "shards": n_shards,
        "reasons": dict(sorted(reasons.items())),
        "peak_rss": peaks.peak_rss,
        "rss_rise": peaks.peak_rss - peaks.start_rss,
        "peak_store": peaks.peak_store,
        "spilled": peaks.spilled,
        "digest": spec_digest(specs) if check else "",
    }


def error_line(e: Exception) -> str:
    """The last line of a (Ray task's) traceback that names an error."""
    lines = [line for line in str(e).splitlines() if "Error" in line or "Invalid" in line]
    return (lines[-1] if lines else type(e).__name__).strip()[:200]


def print_result(rows: int, r: dict) -> None:
    mib = 2**20
    if "error" in r:
        print(f"{r['variant']:>8}  rows {rows:>10,}  FAILED after {r['wall_s']:.1f} s: {r['error']}")
        return
    print(
        f"{r['variant']:>8}  rows {rows:>10,}  wall {r['wall_s']:7.1f} s  "
        f"{rows / r['wall_s']:9,.0f} rows/s  groups {r['groups']:,}  shards {r['shards']:,}  "
        f"driver rss peak {r['peak_rss'] / mib:6.0f} MiB (+{r['rss_rise'] / mib:.0f})  "
        f"object store peak {r['peak_store'] / mib:6.0f} MiB  spilled {r['spilled'] / mib:.0f} MiB"
        + (f"  specs {r['digest']}" if r["digest"] else "")
        + f"  (load average {os.getloadavg()[0]:.1f})",
        flush=True,
    )
    print(f"          reasons {r['reasons']}", flush=True)


def scaling_exponent(rows: list[int], seconds: list[float]) -> float:
    """Slope of log(seconds) against log(rows): 1.0 is linear."""
    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def time_small_build(n_images: int, workdir: Path, variant: str) -> None:
    """Seconds in each build stage of a small prepare_cc12m job (its `stage(...)` blocks)."""
    from pipelines import prepare_cc12m
    from pipelines.demo_corpus import write_cc12m_tsv, write_demo_corpus
    from pipelines.mirror import LoopbackMirror

    corpus = write_demo_corpus(
        workdir / f"planning-build-{n_images}",
        n_images=n_images,
        seed=1,
        image_size=256,
        n_eval_per_class=1,
        n_eval_retrieval=1,
    )
    out = workdir / f"planning-build-{n_images}-{variant}"
    shutil.rmtree(out, ignore_errors=True)
    seconds, logged_stage = {}, build.stage

    @contextlib.contextmanager
    def timed_stage(name: str, detail: str = ""):
        start = time.perf_counter()
        with logged_stage(name, detail):
            yield
        seconds[name] = time.perf_counter() - start

    build.stage = timed_stage
    try:
        with LoopbackMirror(corpus.mirror_root) as mirror, planning_variant(variant):
            tsv = write_cc12m_tsv(corpus, mirror.base_url, workdir / f"planning-build-{n_images}.tsv")
            start = time.perf_counter()
            prepare_cc12m.run(
                prepare_cc12m.parse_args(
                    [
                        "--input",
                        str(tsv),
                        "--output",
                        str(out),
                        "--image-size",
                        "64",
                        "--shard-size",
                        "25",
                        "--allow-loopback-urls",
                    ]
                )
            )
            total = time.perf_counter() - start
    finally:
        build.stage = logged_stage
    split = "  ".join(f"{name.split('/')[-1]} {s:.1f} s" for name, s in seconds.items())
    print(f"{variant:>8}  small build, {n_images} images: {total:.1f} s in run_build: {split}", flush=True)


def plan_yfcc(n_lines: int, workdir: Path, shard_size: int) -> None:
    """YFCC15M's planning from a YFCC100M-layout metadata file and subset list."""
    from benchmarks.synthetic_corpora import write_yfcc
    from pipelines import prepare_yfcc15m
    from pipelines.captions import CaptionRules

    metadata, subset = workdir / f"yfcc-{n_lines}.tsv", workdir / f"yfcc-{n_lines}-subset.tsv"
    if not subset.exists():
        start = time.perf_counter()
        write_yfcc(metadata, subset, n_lines)
        print(
            f"wrote {metadata.name} ({metadata.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    params = build.BuildParams(corpus="yfcc15m", shard_size=shard_size)
    result = run_once(
        "current",
        lambda: prepare_yfcc15m.read_metadata_rows([str(metadata)], str(subset), CaptionRules()),
        params,
        check=False,
    )
    print(f"    yfcc  metadata lines, subset of {sum(1 for _ in open(subset)):,} ids:", flush=True)
    print_result(n_lines, result)


def plan_sharegpt4v(n_records: int, workdir: Path, shard_size: int) -> None:
    """ShareGPT4V's training build planned from its caption JSON, streamed."""
    from benchmarks.synthetic_corpora import write_sharegpt4v
    from pipelines import prepare_sharegpt4v
    from pipelines.captions import CaptionRules

    path = workdir / f"sharegpt4v-{n_records}.json"
    if not path.exists():
        start = time.perf_counter()
        write_sharegpt4v(path, n_records)
        print(
            f"wrote {path.name} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    params = build.BuildParams(corpus="sharegpt4v", shard_size=shard_size)
    result = run_once(
        "current",
        lambda: prepare_sharegpt4v.read_record_rows([str(path)], 1000, None, "/data/sharegpt4v", None, CaptionRules()),
        params,
        check=False,
    )
    print("    sharegpt4v  records (JSON streamed by one task):", flush=True)
    print_result(n_records, result)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="*", default=[1_000_000], help="TSV sizes (none: skip)")
    p.add_argument("--baseline", action="store_true", help="also run the pre-change planning")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workdir", default="bench_out")
    p.add_argument("--num-cpus", type=int, default=None, help="Ray's CPUs (default: all cores)")
    p.add_argument("--build-images", type=int, default=0, help="also time a small whole build")
    p.add_argument(
        "--yfcc-lines",
        type=int,
        default=0,
        help="also plan YFCC: metadata of this many lines joined with a 15 %% subset",
    )
    p.add_argument(
        "--sharegpt4v-records",
        type=int,
        default=0,
        help="also plan ShareGPT4V's training build from a JSON of this many records",
    )
    p.add_argument("--build-variant", choices=sorted(BASELINE_OR_CURRENT), default="current")
    args = p.parse_args(argv)
    from pipelines import ray_setup

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tsvs = {n: write_tsv(workdir, n) for n in sorted({WARMUP_ROWS, *args.rows})} if args.rows else {}
    ray_setup.configure_logging()
    start = time.perf_counter()
    ray_setup.init_ray(num_cpus=args.num_cpus)
    import ray

    print(
        f"ray start-up {time.perf_counter() - start:.1f} s, {ray.cluster_resources().get('CPU', 0):.0f} CPUs",
        flush=True,
    )
    variants = ["baseline", "current"] if args.baseline else ["current"]
    if args.build_images:
        time_small_build(args.build_images, workdir, args.build_variant)
    if args.yfcc_lines:
        plan_yfcc(args.yfcc_lines, workdir, args.shard_size)
    if args.sharegpt4v_records:
        plan_sharegpt4v(args.sharegpt4v_records, workdir, args.shard_size)
    if not args.rows:
        return
    params = build.BuildParams(corpus="cc12m", shard_size=args.shard_size)
    for variant in variants:  # warm-up: worker processes and imports
        run_once(variant, tsv_reader(tsvs[WARMUP_ROWS], params), params, check=False)
    walls = {v: [] for v in variants}
    for n in sorted(args.rows):
        results = [run_once(v, tsv_reader(tsvs[n], params), params, check=args.baseline) for v in variants]
        for r in results:
            print_result(n, r)
            walls[r["variant"]].append((n, r["wall_s"]) if "error" not in r else None)
        if args.baseline and not any("error" in r for r in results):
            same = len({(r["digest"], json.dumps(r["reasons"])) for r in results}) == 1
            print(
                f"          baseline/current wall {results[0]['wall_s'] / results[1]['wall_s']:.2f}x, "
                f"specs and reasons {'identical' if same else 'DIFFER'}",
                flush=True,
            )
    for variant in variants:
        measured = [w for w in walls[variant] if w]
        if len(measured) > 1:
            exponent = scaling_exponent([n for n, _ in measured], [s for _, s in measured])
            print(f"{variant:>8}  scaling exponent {exponent:.2f} (log wall vs log rows, {len(measured)} sizes)")


if __name__ == "__main__":
    main()
