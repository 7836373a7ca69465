"""Evaluate a checkpoint on named suites (each paper's benchmarks) or ad hoc datasets, as its
own Ray job. Every image still to embed, over all datasets, goes through one Ray Data pass
over encoder actors (GPUs on a cluster), every text through a second; embeddings are cached
per checkpoint and dataset, so a re-run only encodes what changed; metrics are NumPy.

    python evaluation/evaluate.py --checkpoint runs/<run> --suite pgs \
        --root clip_benchmark=s3://bucket/clip_benchmark --root coco=/data/coco --output reports/<run>
    python evaluation/evaluate.py --checkpoint runs/<run> --zeroshot demo/eval/zeroshot \
        --retrieval demo/eval/retrieval/dataset_karpathy.json --output reports/<run>
    ray job submit --working-dir . -- python evaluation/evaluate.py --checkpoint s3://... ...

Ad hoc datasets can be named: `--zeroshot NAME=PATH` (an image folder or a CLIP_benchmark
WebDataset folder). A dataset that is missing or unreadable is listed under "skipped" in the
report instead of failing the job. Writes report.json, report.md and PNG plots to --output
(local folder or s3://); `--compare other/report.json` adds a side-by-side plot.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tarfile
import shutil
import tempfile
import uuid
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402

from evaluation import encoders, suites  # noqa: E402
from evaluation.task_registry import (
    IMAGE,
    IMAGE_STATES,
    MODALITIES,
    TASKS,
    Benchmark,
    load_benchmark,  # noqa: E402
    requests,
    score,
)
from evaluation.cache import EmbeddingCache, digest_values, model_fingerprint  # noqa: E402
from scoring.sets.files import Location  # noqa: E402
from evaluation.figures import load_run_metrics  # noqa: E402
from evaluation.inversion import INVERTS, requested_inversion  # noqa: E402
from evaluation.probe_views import requested_views  # noqa: E402
from evaluation.plots import write_plots  # noqa: E402
from evaluation.report import add_group_averages, write_report  # noqa: E402
from pipelines import console, ray_setup, storage  # noqa: E402
from training import checkpoint  # noqa: E402
from training.off_the_shelf import PREFIX as OPEN_CLIP_PREFIX, parse_open_clip_ref  # noqa: E402
from training.inference import SCORER_NAMES, load_inference_model  # noqa: E402

log = logging.getLogger("evaluation")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "clipforge", "embeddings")
AD_HOC = {"zeroshot": "zeroshot", "retrieval": "retrieval", "long_retrieval": "retrieval"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="checkpoint or run directory, local or s3://")
    model.add_argument(
        "--open-clip",
        metavar="ARCH=WEIGHTS",
        help="an off-the-shelf open_clip model: an open_clip weights file (local or s3://) "
        "or pretrained tag, scored with open_clip's own preprocessing and tokenizer",
    )
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        help=f"named suite ({', '.join(suites.available_suites())}) or a suite JSON file",
    )
    p.add_argument("--root", action="append", default=[], metavar="NAME=URI", help="override a suite's data root")
    p.add_argument("--only", nargs="*", default=None, help="evaluate only these benchmark names of the suites")
    p.add_argument("--zeroshot", nargs="*", default=[], help="image-folder or CLIP_benchmark WebDataset sets")
    p.add_argument("--retrieval", nargs="*", default=[], help="Karpathy-layout JSON files (test split)")
    p.add_argument("--long-retrieval", nargs="*", default=[], help="Urban1k-layout folders or shard builds")
    p.add_argument("--output", required=True, help="report folder, local or s3://")
    p.add_argument(
        "--cache",
        default=DEFAULT_CACHE,
        help="embedding cache, local or s3:// ('none' disables); "
        "on a multi-node cluster a folder every node reaches (s3:// or a shared filesystem)",
    )
    p.add_argument(
        "--cache-block",
        type=int,
        default=1024,
        help="inputs per cache entry: a killed pass re-encodes at most one block per encoder actor",
    )
    p.add_argument("--compare", nargs="*", default=[], help="other report.json files to plot beside this one")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-encoders", type=int, default=1, help="Ray Data encoder actors (one GPU each with --use-gpu)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument(
        "--scorer",
        default="plain",
        choices=SCORER_NAMES,
        help="plain cosine (default) or SmartCLIP's masked cosine (training/inference.py)",
    )
    p.add_argument("--ray-address", default=None)
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs too")
    args = p.parse_args(argv)
    if args.open_clip:
        parse_open_clip_ref(args.open_clip)  # a malformed spec fails before Ray starts
        args.checkpoint = f"{OPEN_CLIP_PREFIX}{args.open_clip}"
    return args


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"expected NAME=URI, got {pair!r}")
        out[name] = value
    return out


def ad_hoc_spec(kind: str, path: str) -> dict:
    """The dataset spec of a --zeroshot / --retrieval / --long-retrieval path."""
    location = Location(path)
    if kind == "zeroshot":
        return {"format": "wds" if location.child("test", "nshards.txt").exists() else "image_folder", "path": path}
    if kind == "retrieval":
        return {"format": "karpathy", "path": path}
    return {"format": "long_build" if location.child("manifest.json").exists() else "long_folder", "path": path}


def collect_entries(args: argparse.Namespace) -> list[dict]:
    roots = parse_assignments(args.root)
    entries = [e for suite in args.suite for e in suites.suite_entries(suite, roots)]
    if args.only is not None:
        entries = [e for e in entries if e["name"] in set(args.only)]
    for kind, task in AD_HOC.items():
        for spec in getattr(args, kind):
            name, _, path = spec.rpartition("=")
            entries.append({"name": name or Location(path).name(), "task": task, "test": ad_hoc_spec(kind, path)})
    check_unique_names(entries)
    return entries


def check_unique_names(entries: list[dict]) -> None:
    """Two benchmarks reporting into one section under one name would overwrite each other."""
    seen = set()
    for entry in entries:
        key = (TASKS.get(entry.get("task"), (entry.get("task"),))[0], entry.get("name"))
        if key in seen:
            raise ValueError(f"two benchmarks named {key[1]!r} report into section {key[0]!r}; rename one")
        seen.add(key)


def entry_key(entry: dict) -> str:
    return f"{entry.get('task')}/{entry.get('name')}"


def load_benchmarks(entries: list[dict], skipped: dict) -> list[Benchmark]:
    benchmarks = []
    for i, entry in enumerate(entries, 1):
        try:
            benchmarks.append(load_benchmark(entry))
            log.info("[%d/%d] loaded %s", i, len(entries), entry_key(entry))
        except (OSError, ValueError, KeyError, tarfile.TarError) as err:  # skip it, never fail the suite
            skipped[entry_key(entry)] = f"{type(err).__name__}: {err}"
            log.warning("[%d/%d] skipped %s: %s", i, len(entries), entry_key(entry), err)
    return benchmarks


def encoder_spec(modality: str, args: argparse.Namespace) -> tuple[type, tuple, bool, str]:
    """(encoder class, its constructor arguments, whether it reads images, progress label) of a
    request: the topology's embeddings, class-token states, or an inversion (OTI reads images,
    OVI texts). Its checkpoint is the one the driver resolved (args.pinned_checkpoint)."""
    inversion = requested_inversion(modality)
    views = requested_views(modality)
    is_image = (
        modality in (IMAGE, IMAGE_STATES)
        or views is not None
        or (inversion is not None and INVERTS[inversion.kind] == IMAGE)
    )
    constructor = (args.pinned_checkpoint, "cuda" if args.use_gpu else "cpu", args.scorer)
    if is_image:
        output = "class_states" if modality == IMAGE_STATES or views else "oti" if inversion else "embedding"
        constructor += (output,)
    constructor += (None if inversion is None else dataclasses.asdict(inversion),)
    if views is not None:
        constructor += (dataclasses.asdict(views),)
    label = {IMAGE_STATES: "image class states"}.get(modality, f"{modality}s")
    if views is not None:
        label = f"image class states, {views.views} augmented views each"
    if inversion is not None:
        label = f"invert {INVERTS[inversion.kind]}s ({inversion.kind.upper()}, {inversion.num_steps} steps)"
    return (encoders.ImageEncoder if is_image else encoders.TextEncoder), constructor, is_image, label


def encode(modality: str, blocks: list[list], cache: EmbeddingCache, args: argparse.Namespace) -> list[np.ndarray]:
    """(n, D) features of each block of inputs, in order, from encoder actors that publish
    each block to the cache as they finish it."""
    encoder, constructor, is_image, label = encoder_spec(modality, args)
    out = ray.data.from_items(encoders.block_rows(blocks, is_image)).map_batches(
        encoders.BlockEncoder,
        fn_constructor_args=(
            encoder,
            constructor,
            is_image,
            modality,
            args.batch_size,
            cache.root,
            cache.fingerprint,
            args.checkpoint_cache,
        ),
        batch_size=1,
        batch_format="numpy",
        num_gpus=1 if args.use_gpu else 0,
        compute=ray.data.ActorPoolStrategy(size=args.num_encoders),
    )
    done = {}
    with console.Progress(f"encode {label}", sum(map(len, blocks)), modality) as progress:
        for batch in out.iter_batches(batch_size=None, batch_format="numpy"):
            for index, features in zip(batch[encoders.INDEX], batch[encoders.EMBEDDING]):
                done[int(index)] = np.asarray(features, dtype=np.float32)
                progress.update(len(done[int(index)]))
    return [done[i] for i in range(len(blocks))]


def split_blocks(values: list, size: int) -> list[list]:
    return [values[i : i + size] for i in range(0, len(values), size)]


def embed(benchmarks: list[Benchmark], cache: EmbeddingCache, args: argparse.Namespace) -> list[dict]:
    """Each benchmark's embeddings by role: cached blocks loaded, the rest encoded in one pass
    per modality (inputs shared by several benchmarks, e.g. a test split, are encoded once)."""
    wanted = [requests(b) for b in benchmarks]
    unique = {(m, digest_values(vs)): (m, vs) for reqs in wanted for m, vs in reqs.values()}
    blocks = {key: split_blocks(vs, args.cache_block) for key, (_, vs) in unique.items()}
    done = {(key, i): cache.load(key[0], block) for key, bs in blocks.items() for i, block in enumerate(bs)}
    for modality in [*MODALITIES, *sorted({m for m, _ in unique} - set(MODALITIES))]:  # inversions last
        todo = [slot for slot, feats in done.items() if feats is None and slot[0][0] == modality]
        if todo:
            for slot, features in zip(todo, encode(modality, [blocks[k][i] for k, i in todo], cache, args)):
                done[slot] = features
    features = {
        key: np.concatenate([done[(key, i)] for i in range(len(bs))]) if bs else None for key, bs in blocks.items()
    }
    return [{role: features[(m, digest_values(vs))] for role, (m, vs) in reqs.items()} for reqs in wanted]


def checkpoint_fingerprint(bundle) -> str:
    if "weights_sha256" in bundle.info:  # an open_clip model: its file and its own preprocessing
        return model_fingerprint(
            bundle.info["weights_sha256"],
            {"preprocess": bundle.preprocess.config, "arch": bundle.info["arch"], "source": "open_clip"},
        )
    state = checkpoint.read_state(Path(bundle.info["resolved"]))
    return model_fingerprint(
        state["files"][checkpoint.MODEL_FILE],
        {
            "image_size": bundle.preprocess.image_size,
            "preprocess": type(bundle.preprocess).__name__,
            "arch": bundle.info["arch"],
            "scorer": bundle.info.get("scorer", "plain"),
        },
    )


def describe(bench: Benchmark) -> dict:
    """What the report records of a benchmark's data: its specs and a digest of each input."""
    return {
        "task": bench.task,
        "specs": bench.specs,
        "digests": {role: digest_values(values) for role, (_, values) in requests(bench).items()},
    }


def job_checkpoint_cache(uri: str) -> str | None:
    """This job's own folder for an s3:// checkpoint, the same path on every node: the driver
    and the encoder actors of a node share one download of it, and `remove_node_folders`
    deletes it everywhere afterwards (None for a local checkpoint, read where it is)."""
    if "://" not in uri:
        return None
    return os.path.join(tempfile.gettempdir(), "clipforge-checkpoints", uuid.uuid4().hex)


def pin_checkpoint(args: argparse.Namespace, bundle) -> None:
    """The encoder actors load the exact checkpoint the driver resolved (a run that writes a
    new checkpoint meanwhile cannot mix two into one report)."""
    args.pinned_checkpoint = bundle.info.get("checkpoint_uri", args.checkpoint)


@ray.remote(num_cpus=0)
def remove_folder(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_node_folders(path: str | None) -> None:
    """Delete `path` on every alive node of the cluster."""
    if path is None:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.get(
        [
            remove_folder.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(path)
            for node in ray.nodes()
            if node["Alive"]
        ]
    )


def run_evaluation(args: argparse.Namespace) -> dict:
    args.checkpoint_cache = job_checkpoint_cache(args.checkpoint)
    try:
        return evaluate_pinned(args)
    finally:
        remove_node_folders(args.checkpoint_cache)


def evaluate_pinned(args: argparse.Namespace) -> dict:
    bundle = load_inference_model(
        args.checkpoint,
        scorer=args.scorer,  # info["scorer"] is reported
        cache_dir=args.checkpoint_cache,
    )
    pin_checkpoint(args, bundle)
    fingerprint = checkpoint_fingerprint(bundle)
    report = {
        "checkpoint": {**bundle.info, "fingerprint": fingerprint},
        "suites": list(args.suite),
        "zeroshot": {},
        "retrieval": {},
        "linear_probe": {},
        "compositionality": {},
        "intra_modal": {},
        "datasets": {},
        "skipped": {},
    }
    entries = collect_entries(args)
    with console.stage("evaluate/load", f"{len(entries)} benchmark(s)"):
        benchmarks = load_benchmarks(entries, report["skipped"])
    cache = EmbeddingCache(None if args.cache == "none" else args.cache, fingerprint)
    stale = cache.stale_claims()  # one listing (a list request per call on s3://)
    if stale:
        log.info("embedding cache: %d block(s) were in progress when an earlier pass stopped", len(stale))
    with console.stage("evaluate/encode", "images and texts not cached"):
        features = embed(benchmarks, cache, args)
    log.info("embedding cache: %d block hit(s), %d block miss(es)", cache.hits, cache.misses)
    with console.stage("evaluate/score"):
        score_all(report, benchmarks, features, bundle)
    add_group_averages(report, entries)
    return report


def score_all(report: dict, benchmarks: list[Benchmark], features: list[dict], bundle) -> None:
    for i, (bench, feats) in enumerate(zip(benchmarks, features), 1):
        try:
            report[bench.section][bench.name] = score(bench, feats, bundle.topology)
            log.info("[%d/%d] scored %s/%s", i, len(benchmarks), bench.task, bench.name)
            report["datasets"][entry_key(vars(bench))] = describe(bench)
        except ValueError as err:  # e.g. non-finite scores from a diverged model
            report["skipped"][entry_key(vars(bench))] = f"ValueError: {err}"


def publish_report(report: dict, output: str, compare: list[str] = ()) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        plots = write_plots(report, tmp, compare, load_run_metrics(report.get("checkpoint", {})))
        paths = [*write_report(report, tmp, [p.name for p in plots]), *plots]
        fs, path = storage.open_storage(output)
        for local in paths:
            storage.write_bytes_atomic(fs, storage.join(path, Path(local).name), Path(local).read_bytes())


def main(argv=None) -> dict:
    args = parse_args(argv)
    ray_setup.configure_logging(args.verbose)
    ray_setup.init_ray(args.ray_address)
    with console.stage("evaluate", args.checkpoint):
        report = run_evaluation(args)
        with console.stage("evaluate/report", args.output):
            publish_report(report, args.output, args.compare)
    print(f"report written to {args.output}")
    return report


if __name__ == "__main__":
    main()
