"""Train a CLIP-style model with Ray Train from prepared shards.

    python training/train.py --data ./shards/cc12m/<build-id> --method flip --num-workers 2
    ray job submit --working-dir . -- python training/train.py --data s3://bucket/shards/cc12m/<id> \
        --method flip --arch ViT-B-16 --num-workers 8 --use-gpu --storage s3://bucket/runs --run-name x
    python training/train.py --data <cc12m-build>:0.7 <yfcc15m-build>:0.3 ...   # a mixture of builds

Each worker streams its own deterministic slice of the shards through Ray Data (decode,
joint crop of image and edge map, per-patch edge scores, caption sampling, tokenisation on
CPU workers) into the loop in `training/loop.py`. `--resume` continues an existing run from
its latest checkpoint with the same data order.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue as queue_lib
import sys
import tempfile
import threading
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train.torch import TorchConfig, TorchTrainer  # noqa: E402
from ray.util.queue import Queue  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

from pipelines import console, ray_setup, storage  # noqa: E402
from pipelines.provenance import code_version  # noqa: E402
from training import checkpoint, data_mixture, data_order, export, ray_entry, resume  # noqa: E402
from training.data_stage import iter_worker_batches  # noqa: E402
from training.config import TrainConfig, apply_overrides, config_from_dict, config_to_dict  # noqa: E402
from training.in_run_eval import InRunEvaluator, check_eval_config  # noqa: E402
from training.loop import LoopSettings, run_training  # noqa: E402
from training.methods.recipes import build_method_config, check_combination, resolve_auto_fields  # noqa: E402
from training.model import build_training_model, sample_geometry  # noqa: E402
from training.auxiliary import check_ranks_agree, parts_of  # noqa: E402
from training.objectives import build_training_objective  # noqa: E402
from training.optim import build_optimizer, build_scheduler  # noqa: E402
from training.compilation import compile_towers  # noqa: E402
from training.precision import MasterWeights, resolve_precision  # noqa: E402
from training.sharding import gather_full_state, is_sharded, local_parameter_count, shard_training_state  # noqa: E402
from training.tracking import build_tracker, wandb_settings  # noqa: E402

FLAG_TO_FIELD = {
    "arch": "model.arch",
    "pretrained": "model.pretrained",
    "mask_ratio": "masking.ratio",
    "batch_size": "data.batch_size_per_worker",
    "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps",
    "epochs": "run.epochs",
    "max_steps": "run.max_steps",
    "seed": "run.seed",
    "num_workers": "run.num_workers",
    "run_name": "run.name",
    "storage": "run.storage",
    "log_every": "run.log_every",
    "checkpoint_every": "run.checkpoint_every",
    "eval_every": "eval.every",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        required=True,
        nargs="+",
        metavar="URI[:WEIGHT]",
        help="build root(s): <root>/<corpus>/<build-id>; several builds with sampling weights make "
        "a mixture, e.g. s3://b/shards/cc12m/ID:0.7 s3://b/shards/yfcc15m/ID:0.3",
    )
    p.add_argument("--method", default="clip")
    for flag in FLAG_TO_FIELD:
        p.add_argument(f"--{flag.replace('_', '-')}", default=None)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the run from its latest checkpoint")
    p.add_argument(
        "--allow-change",
        action="append",
        default=[],
        choices=resume.CHANGES,
        help="let --resume continue although this part of the run's settings differs from "
        "its checkpoint's (data, method, architecture, batch, schedule)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any config field, e.g. --set optim.weight_decay=0.1",
    )
    p.add_argument(
        "--eval-set",
        action="append",
        default=[],
        metavar="NAME=FORMAT:PATH",
        help="a small set to evaluate on during the run every --eval-every steps (zero-shot for a "
        "classification set, retrieval for a captioned one), e.g. pets=image_folder:/data/pets",
    )
    p.add_argument("--export", default=None, help="after training, write an open_clip checkpoint file")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs too")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> TrainConfig:
    overrides = {field: getattr(args, flag) for flag, field in FLAG_TO_FIELD.items() if getattr(args, flag) is not None}
    overrides.update(dict(item.split("=", 1) for item in args.set))
    overrides.update({"data.builds": tuple(args.data), "run.use_gpu": args.use_gpu})
    if args.eval_set:
        overrides["eval.sets"] = tuple(args.eval_set)
    config = resolve_auto_fields(apply_overrides(build_method_config(args.method), overrides))
    check_combination(config)
    check_eval_config(config.eval)
    return config


def restore(ckpt, model, optimizer, scheduler, parts=(), run_dir: str | None = None) -> int:
    """Step of the run's latest checkpoint `ckpt` (0 for a fresh run, None), state restored
    in place, the objective's auxiliary parts included."""
    if ckpt is None:
        return 0
    with ckpt.as_directory() as directory:
        return checkpoint.load_training_state(Path(directory), model, optimizer, scheduler, parts, run_dir)["step"]


def build_reporter(
    config: TrainConfig, rank: int, model, optimizer, scheduler, extra: dict, parts, run_dir: str, tracker
):
    def report(step: int, metrics: dict, want_checkpoint: bool) -> None:
        tracker.log(step, metrics)
        if not want_checkpoint:
            ray.train.report({**metrics, "step": step})
            return
        digests = check_ranks_agree(parts, step)
        gathered = gather_full_state(model, optimizer) if is_sharded(model) else None  # every rank
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                checkpoint.save_checkpoint(
                    Path(tmp),
                    model,
                    optimizer,
                    scheduler,
                    step,
                    config,
                    {**extra, **({"auxiliary_rank_digests": digests} if digests else {})},
                    parts,
                    run_dir,
                    gathered,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": step}, checkpoint=ckpt, checkpoint_dir_name=f"step_{step:08d}")

    return report


def run_directory(config: TrainConfig) -> str:
    """<storage>/<name>, where Ray Train puts the checkpoints (a local one made absolute on
    the driver: workers run in a directory of their own)."""
    run_dir = storage.join(config.run.storage, config.run.name)
    return run_dir if "://" in run_dir else str(Path(run_dir).resolve())


def build_training_state(config: TrainConfig, loop_config: dict, device: torch.device, fresh: bool = True):
    """(model, optimizer, scheduler) of a fresh run, the same on every worker (seeded init);
    for a resume (`fresh=False`) the architecture only: the checkpoint brings the weights, so
    `--pretrained` is not fetched again."""
    torch.manual_seed(config.run.seed)
    model = build_training_model(config, with_weights=fresh).to(device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.optim.warmup_steps, loop_config["schedule_steps"])
    return model, optimizer, scheduler


def loop_settings(
    config: TrainConfig, loop_config: dict, rank: int, world: int, device: torch.device, start_step: int
) -> LoopSettings:
    precision = resolve_precision(config.run.precision, device)
    return LoopSettings(
        start_step=start_step,
        total_steps=loop_config["stop_step"],
        seed=config.run.seed,
        rank=rank,
        world_size=world,
        device=device,
        log_every=config.run.log_every,
        checkpoint_every=config.run.checkpoint_every,
        grad_clip_norm=config.optim.grad_clip_norm,
        bf16=precision == "amp_bf16",
        parts_bf16=precision == "bf16",
        epoch_steps=tuple(loop_config["epoch_steps"]),
        accum_freq=config.run.accum_freq,
        eval_every=config.eval.every,
    )


def parallelize(config: TrainConfig, loop_config: dict, model, optimizer, scheduler, device: torch.device):
    """(model, optimizer, scheduler, the module the steps run, master weights or None) of
    `run.sharding` and `run.precision`: DDP over the model (or over its bfloat16 copy with
    float32 masters), or FSDP2 with its own mixed precision; `run.compile` after either."""
    bf16 = resolve_precision(config.run.precision, device) == "bf16"
    weights = None
    if config.run.sharding == "fsdp":
        model, optimizer, scheduler = shard_training_state(
            model,
            optimizer,
            scheduler,
            lambda m: build_optimizer(m, config.optim),
            lambda o: build_scheduler(o, config.optim.warmup_steps, loop_config["schedule_steps"]),
            device,
            bf16,
        )
        runner = model
        print(f"FSDP2: {local_parameter_count(model):,} parameters on this worker", flush=True)
    else:
        weights = MasterWeights(model) if bf16 else None
        runner = weights.compute if weights else model
    if config.run.compile:
        compile_towers(runner, config.run.compile_backend)
    if config.run.sharding != "fsdp":
        runner = ray.train.torch.prepare_model(runner, move_to_device=False)
    return model, optimizer, scheduler, runner, weights


def run_worker(loop_config: dict) -> None:
    """One Ray Train worker's run (entered through `ray_entry.train_loop_per_worker`)."""
    config = config_from_dict(loop_config["config"])
    sources = data_mixture.from_plan(loop_config["sources"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    world = context.get_world_size()
    device = ray.train.torch.get_device()
    ckpt = ray.train.get_checkpoint()
    run_dir = loop_config["run_dir"]
    print(
        f"train worker {rank}/{world} on node {ray.get_runtime_context().get_node_id()}, "
        f"{'resuming from ' + ckpt.path if ckpt else 'fresh'}",
        flush=True,
    )
    model, optimizer, scheduler = build_training_state(config, loop_config, device, fresh=ckpt is None)
    objective = build_training_objective(config, rank, world, model, device, fresh=ckpt is None)
    parts = parts_of(objective)
    start_step = restore(ckpt, model, optimizer, scheduler, parts, run_dir)
    resume.check_restored(start_step, loop_config.get("resume_step", 0), run_dir)
    geometry = sample_geometry(model, config.model.arch)
    model, optimizer, scheduler, runner, weights = parallelize(config, loop_config, model, optimizer, scheduler, device)
    settings = loop_settings(config, loop_config, rank, world, device, start_step)
    batches = iter_worker_batches(
        config.data, config.run.seed, config.run.epochs, sources, rank, world, start_step, geometry
    )
    tracker = build_tracker(rank, run_dir, config.run.tensorboard_dir, start_step, loop_config.get("wandb"))
    # checkpoints hold the float32 model (the masters under bf16), so a resume is exact
    report = build_reporter(
        config, rank, model if weights else runner, optimizer, scheduler, loop_config["extra"], parts, run_dir, tracker
    )
    evaluate = (
        InRunEvaluator(
            config.eval, geometry.image_size, geometry.tokenizer(), rank, world, device, autocast=settings.bf16
        )
        if config.eval.every
        else None
    )
    try:
        run_training(runner, objective, optimizer, scheduler, batches, settings, report, weights, evaluate)
    finally:
        tracker.close()


CONSOLE_EVAL = ("/top1", "/image_retrieval_recall@1")  # the in-run figures the progress line shows


def console_fields(metrics: dict) -> dict:
    """The progress line's figures: loss, temperature, throughput, and on an evaluation step
    each set's top-1 or text-to-image R@1 ("scenes/top1 0.31")."""
    fields = {
        "loss": metrics.get("loss/total"),
        "temp": metrics.get("temperature"),
        "samples/s": metrics.get("samples_per_s"),
    }
    fields.update(
        {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/") and k.endswith(CONSOLE_EVAL)}
    )
    return {k: float(v) for k, v in fields.items() if v is not None}


@contextlib.contextmanager
def follow_reports(total_steps: int):
    """(Ray queue for ReportForwarder) and, while the block runs, one console line per
    report: `train  step 120/468  26%  loss 2.31 ...  3.1 steps/s  eta 1m30s`."""
    # The queue's actor lives on the driver's node: anywhere else, a lost node could take it along.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    reports = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()
    progress = console.Progress("train", total_steps, "step", every_s=0)

    def pump(block: bool) -> bool:
        try:
            metrics = reports.get(block=block, timeout=0.5 if block else None)
        except queue_lib.Empty:  # ray.util.queue.Empty is one
            return False
        progress.set(int(metrics["step"]), **console_fields(metrics))
        return True

    def follow() -> None:
        while not stop.is_set():
            pump(True)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield reports
    finally:
        stop.set()
        thread.join()
        while pump(False):
            pass
        progress.close()
        reports.shutdown()


def plan_steps(config: TrainConfig, sources: list[data_order.Source]) -> dict:
    """The schedule spans all epochs; `run.max_steps` only stops early (an interrupted or
    budget-capped run), so a later `--resume` continues the very same schedule."""
    epoch_steps = [
        data_order.compute_epoch_steps(
            sources, config.run.seed, epoch, config.run.num_workers, config.data.batch_size_per_worker
        )
        for epoch in range(config.run.epochs)
    ]
    total = sum(epoch_steps)
    if total == 0:
        entries = [e for s in sources for e in s.entries]
        raise ValueError(
            f"no full batch for every worker: {config.run.num_workers} workers of "
            f"{config.data.batch_size_per_worker} samples each, but the data has "
            f"{len(entries)} shards of {[e['n_samples'] for e in entries][:8]}... "
            "samples (each worker reads whole shards: use smaller shards or fewer workers)"
        )
    return {"schedule_steps": total, "stop_step": min(total, config.run.max_steps or total), "epoch_steps": epoch_steps}


def build_run_config(config: TrainConfig, callbacks: list = ()) -> ray.train.RunConfig:
    fs, storage_path = storage.arrow_filesystem(config.run.storage)
    if fs is None:
        storage_path = str(Path(storage_path).resolve())
    return ray.train.RunConfig(
        name=config.run.name,
        storage_path=storage_path,
        storage_filesystem=fs,
        callbacks=list(callbacks),
        logging_config=ray.train.LoggingConfig(log_level=ray_setup.ray_train_log_level()),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=config.run.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
    )


def fit(config: TrainConfig, resume_run: bool = False, allow_changes=()):
    """Train, relaunching from the latest checkpoint (up to run.max_failures times) when Ray
    Train's controller itself fails: Ray 2.60's controller can die with ControllerError when a
    node is lost while it polls that node's workers (tests/test_cluster.py hit it), a failure
    its own FailureConfig does not retry."""
    for relaunch in range(config.run.max_failures + 1):
        try:
            return fit_once(config, resume_run, allow_changes)
        except ray.train.ControllerError as err:
            if relaunch == config.run.max_failures or resume.latest_saved_state(run_directory(config)) is None:
                raise
            print(
                f"Ray Train's controller failed ({type(err).__name__}: {str(err)[:200]}); relaunching "
                f"{config.run.name!r} from its latest checkpoint ({relaunch + 1}/{config.run.max_failures})",
                flush=True,
            )
            resume_run = True


def fit_once(config: TrainConfig, resume_run: bool = False, allow_changes=()):
    sources = data_mixture.load_sources(config.data.builds)
    extra = {**data_mixture.describe_sources(sources), "code_version": code_version()}
    plan = {**plan_steps(config, sources), "run_dir": run_directory(config)}
    plan["wandb"] = wandb_settings(config.run.wandb_project, config.run.name, plan["run_dir"], config_to_dict(config))
    saved = resume.check_run_state(plan["run_dir"], config.run.name, resume_run)
    if saved is not None:
        resume.check_resume(saved, config, sources, allow_changes)
        plan["resume_step"] = saved["step"]
    with follow_reports(plan["stop_step"]) as reports:
        return make_trainer(config, sources, extra, plan, ray_entry.ReportForwarder(reports)).fit()


def make_trainer(
    config: TrainConfig, sources: list[data_order.Source], extra: dict, plan: dict, callback
) -> TorchTrainer:
    return TorchTrainer(
        ray_entry.train_loop_per_worker,
        train_loop_config={
            "config": config_to_dict(config),
            "sources": data_mixture.to_plan(sources),
            "extra": extra,
            **plan,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.run.num_workers,
            use_gpu=config.run.use_gpu,
            resources_per_worker={"CPU": config.run.cpus_per_worker},
            placement_strategy=config.run.placement_strategy,
        ),
        torch_config=TorchConfig(backend="nccl" if config.run.use_gpu else "gloo"),
        run_config=build_run_config(config, [callback]),
    )


def local_cpu_budget(config: TrainConfig) -> int:
    """Logical CPUs of a local instance: every worker's own CPU plus its data actors."""
    needed = config.run.num_workers * (config.run.cpus_per_worker + config.data.preprocess_concurrency)
    return max(os.cpu_count() or 1, int(np.ceil(needed)))


def main(argv=None):
    args = parse_args(argv)
    config = build_config(args)
    ray_setup.configure_logging(args.verbose)
    # Locally, training workers hold their CPUs while Ray Data decodes for them: give the
    # local instance logical CPUs for both (a cluster sizes itself).
    ray_setup.init_ray(args.ray_address, num_cpus=local_cpu_budget(config))
    with console.stage("train", f"{config.method} {config.model.arch}, {config.run.num_workers} workers"):
        result = fit(config, resume_run=args.resume, allow_changes=args.allow_change)
    print(f"latest checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    if args.export and result.checkpoint:
        export.export_open_clip(storage.join(config.run.storage, config.run.name), args.export)
        print(f"open_clip export: {args.export}")
    return result


if __name__ == "__main__":
    main()
