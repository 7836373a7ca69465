"""run.sharding=fsdp on 2 gloo workers with a tiny tower: each rank holds about half the
parameters, the losses and weights follow DDP's step for step (with 2 micro-batches on the
FSDP side for some steps), the gathered checkpoint is the one DDP writes and loads for
evaluation and the open_clip export, and a resume from it continues with DDP's losses."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from training import checkpoint, export
from training.checkpoint import unwrap
from training.config import apply_overrides
from training.inference import load_inference_model
from training.batches import SHORT_TEXTS
from training.methods.longclip.loss import LongClipLoss
from training.loop import LoopSettings, seed_step, train_step
from training.methods.recipes import build_method_config
from training.model import build_training_model
from training.objectives import build_training_objective
from training.optim import build_optimizer, build_scheduler
from training.compilation import compile_metrics, compile_towers
from training.sharding import gather_full_state, is_sharded, local_parameter_count, shard_training_state
from training.config import EvalConfig
from training.in_run_eval import InRunEvaluator
from training.model import sample_geometry
from tests.eval_fixtures import write_class_folder, write_karpathy
from tests.test_accumulation import ARCH, METHODS, make_batch

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")
STEPS = 3  # then a resume for steps 4 and 5
ACCUM = {0: 1, 1: 2, 2: 2}  # FSDP's micro-batches per step (DDP: always 1)


def build(config, fresh: bool = True):
    torch.manual_seed(config.run.seed)
    model = build_training_model(config, with_weights=fresh)
    optimizer = build_optimizer(model, config.optim)
    return model, optimizer, build_scheduler(optimizer, config.optim.warmup_steps, 10)


def shard(config, model, optimizer, scheduler, bf16: bool = False):
    return shard_training_state(
        model,
        optimizer,
        scheduler,
        lambda m: build_optimizer(m, config.optim),
        lambda o: build_scheduler(o, config.optim.warmup_steps, 10),
        CPU,
        bf16,
    )


def step(model, objective, optimizer, scheduler, rank: int, number: int, accum: int = 1) -> tuple[float, float]:
    settings = LoopSettings(0, 10, 0, rank, 2, CPU, grad_clip_norm=0.5, accum_freq=accum)
    batch = make_batch(unwrap(model).tower.context_length, seed=10 * number + rank)
    if not isinstance(objective, LongClipLoss):
        batch.pop(SHORT_TEXTS)
    if accum == 1:
        seed_step(model, 0, number, rank)  # FLIP's masks, as the loop draws them
    metrics = train_step(model, objective, optimizer, scheduler, batch, settings, step=number)
    return metrics["loss/total"].item(), metrics["grad_norm"].item()


def save(directory: Path, config, model, optimizer, scheduler, rank: int, gathered=None) -> None:
    if rank == 0:
        checkpoint.save_checkpoint(directory, model, optimizer, scheduler, STEPS, config, {}, gathered=gathered)


def run_rank(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        record = compare_to_ddp(rank, Path(out))
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record))


def method_config(method: str, overrides: dict):
    return apply_overrides(
        build_method_config(method),
        {"model.arch": ARCH, "optim.lr": 1e-3, "optim.warmup_steps": 1, "loss.learn_temperature": True, **overrides},
    )


def every_method_step(rank: int) -> dict:
    """(DDP's, FSDP's) first step for each method: every other model shards as CLIP's does."""
    losses = {}
    for name, (method, overrides) in sorted({**METHODS, "pgs": ("pgs0.5", {})}.items()):
        config = method_config(method, overrides)
        model, optimizer, scheduler = build(config)
        objective = build_training_objective(config, rank, 2, model, CPU)
        ddp = step(torch.nn.parallel.DistributedDataParallel(model), objective, optimizer, scheduler, rank, 0)
        sharded, s_opt, s_sched = shard(config, *build(config))
        losses[name] = (ddp, step(sharded, objective, s_opt, s_sched, rank, 0))
    return losses


def in_run_evaluator(config, model, rank: int, out: Path) -> InRunEvaluator:
    sets = (f"colours=image_folder:{out / 'colours'}", f"shots=karpathy:{out / 'shots' / 'dataset_tiny.json'}")
    geometry = sample_geometry(model, config.model.arch)
    return InRunEvaluator(
        EvalConfig(every=1, sets=sets, batch_size=4), geometry.image_size, geometry.tokenizer(), rank, 2, CPU
    )


def compare_to_ddp(rank: int, out: Path) -> dict:
    config = method_config("clip", {})
    model, optimizer, scheduler = build(config)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    objective = build_training_objective(config, rank, 2, model, CPU)
    sharded, s_opt, s_sched = shard(config, *build(config))
    whole = sum(p.numel() for p in model.parameters())
    local = local_parameter_count(sharded)
    record = {"fraction": local / whole, "ddp": [], "fsdp": []}
    for number in range(STEPS):
        record["ddp"].append(step(ddp, objective, optimizer, scheduler, rank, number))
        record["fsdp"].append(step(sharded, objective, s_opt, s_sched, rank, number, ACCUM[number]))
    save(out / "ddp", config, model, optimizer, scheduler, rank)
    save(out / "fsdp", config, sharded, s_opt, s_sched, rank, gather_full_state(sharded, s_opt))
    dist.barrier()
    resumed, r_opt, r_sched = build(config, fresh=False)
    checkpoint.load_training_state(out / "fsdp", resumed, r_opt, r_sched)
    resumed, r_opt, r_sched = shard(config, resumed, r_opt, r_sched)
    evaluate = in_run_evaluator(config, model, rank, out)
    for number in (STEPS, STEPS + 1):  # the second step's loss follows the first's AdamW update
        record["ddp"].append(step(ddp, objective, optimizer, scheduler, rank, number))
        record["fsdp"].append(step(resumed, objective, r_opt, r_sched, rank, number))
        if number == STEPS:  # in-run evaluation between the two: it must leave training as it was
            record["eval_ddp"], record["eval_fsdp"] = evaluate(ddp), evaluate(resumed)
            record["fsdp_after_eval"] = {"training": resumed.training, "sharded": is_sharded(resumed)}
    record["lr"] = [optimizer.param_groups[0]["lr"], r_opt.param_groups[0]["lr"]]
    mixed, m_opt, m_sched = shard(config, *build(config), bf16=True)  # run.precision=bf16 under FSDP
    record["bf16"] = step(mixed, objective, m_opt, m_sched, rank, 0)
    record["bf16_dtypes"] = sorted({str(p.dtype) for p in mixed.parameters()})
    record["methods"] = every_method_step(rank)
    compiled, c_opt, c_sched = shard(config, *build(config))  # run.compile after fully_shard, as train.py does
    compile_towers(compiled, "aot_eager")
    record["compiled"] = [step(compiled, objective, c_opt, c_sched, rank, n, ACCUM[n]) for n in range(2)]
    record["compiled_graph_breaks"] = compile_metrics().get("compile/graph_breaks")
    return record


@pytest.fixture(scope="module")
def fsdp_and_ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharding")
    write_class_folder(out / "colours", n_per_class=2)  # 12 images: 6 per worker
    write_karpathy(out / "shots", 5)  # 5 images, 15 captions: the shares are padded
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run_rank, args=(port, str(out)), nprocs=2, join=True)
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_in_run_evaluation_runs_on_the_sharded_model_and_leaves_training_as_it_was(fsdp_and_ddp):
    """Both ranks evaluate the FSDP model (root gathered, blocks gathering around their
    forwards, equal forwards per rank), get the same figures as each other and about DDP's
    (the weights agree to float32 rounding); the model is sharded and training again after,
    and the next step's loss still follows DDP's (the losses test)."""
    _, records = fsdp_and_ddp
    assert records[0]["eval_fsdp"] == records[1]["eval_fsdp"] and records[0]["eval_ddp"] == records[1]["eval_ddp"]
    fsdp, ddp = records[0]["eval_fsdp"], records[0]["eval_ddp"]
    assert set(fsdp) == set(ddp) and {"eval/colours/top1", "eval/shots/image_retrieval_recall@1"} <= set(fsdp)
    for key in fsdp:
        assert fsdp[key] == pytest.approx(ddp[key], abs=0.1), key
    assert records[0]["fsdp_after_eval"] == {"training": True, "sharded": True}


def test_each_rank_holds_about_half_the_parameters(fsdp_and_ddp):
    _, records = fsdp_and_ddp
    for record in records:  # shards are padded to equal size; the logit scale is whole on both
        assert 0.45 <= record["fraction"] <= 0.55, record["fraction"]


def test_losses_and_gradient_norms_follow_ddp_through_accumulation_and_a_resume(fsdp_and_ddp):
    _, records = fsdp_and_ddp
    for record in records:
        assert len(record["ddp"]) == len(record["fsdp"]) == STEPS + 2
        assert record["lr"][0] == record["lr"][1]  # the schedule came back too
        for (ddp_loss, ddp_norm), (loss, norm) in zip(record["ddp"], record["fsdp"]):
            assert loss == pytest.approx(ddp_loss, rel=1e-5)
            assert norm == pytest.approx(ddp_norm, rel=1e-4)  # clipped at 0.5: the global norm matters


def test_the_gathered_checkpoint_is_ddps_and_loads_for_evaluation_and_export(fsdp_and_ddp, tmp_path):
    out, _ = fsdp_and_ddp
    for name in (checkpoint.MODEL_FILE, checkpoint.OPTIMIZER_FILE):
        ddp, fsdp = load_file(out / "ddp" / name), load_file(out / "fsdp" / name)
        assert sorted(ddp) == sorted(fsdp)
        for key, value in ddp.items():
            torch.testing.assert_close(fsdp[key], value, rtol=1e-4, atol=1e-6, msg=key)
    ddp_state, fsdp_state = (checkpoint.read_state(out / n) for n in ("ddp", "fsdp"))
    assert fsdp_state["optimizer"]["param_groups"] == ddp_state["optimizer"]["param_groups"]
    assert fsdp_state["scheduler"] == ddp_state["scheduler"]
    loaded = load_inference_model(str(out / "fsdp"))
    assert loaded.info["step"] == STEPS
    exported = export.export_open_clip(str(out / "fsdp"), str(tmp_path / "model.pt"))
    model = open_clip.create_model(ARCH, pretrained=exported)
    weights = load_file(out / "fsdp" / checkpoint.MODEL_FILE)
    torch.testing.assert_close(model.visual.proj.detach(), weights["tower.visual.proj"])


def test_bf16_under_fsdp_computes_in_bfloat16_on_float32_shards(fsdp_and_ddp):
    _, records = fsdp_and_ddp
    for record in records:
        assert record["bf16_dtypes"] == ["torch.float32"]  # the optimiser's shards
        (loss, _), (ddp_loss, _) = record["bf16"], record["ddp"][0]
        assert loss != ddp_loss and loss == pytest.approx(ddp_loss, rel=2e-2)  # bfloat16 arithmetic


def test_every_method_shards_with_ddps_loss(fsdp_and_ddp):
    """FLIP, PGS, SmartCLIP's mask network, Long-CLIP, the oblique and multi-[CLS] towers."""
    _, records = fsdp_and_ddp
    for record in records:
        assert sorted(record["methods"]) == sorted({*METHODS, "pgs"})
        for name, ((ddp_loss, ddp_norm), (loss, norm)) in record["methods"].items():
            assert loss == pytest.approx(ddp_loss, rel=1e-5), name
            assert norm == pytest.approx(ddp_norm, rel=1e-4), name


def test_compiled_blocks_shard_with_the_eager_losses(fsdp_and_ddp):
    """torch.compile (aot_eager: dynamo and AOT autograd) on the FSDP units, with and without
    micro-batches: the eager FSDP (= DDP) losses, no graph break."""
    _, records = fsdp_and_ddp
    for record in records:
        assert record["compiled_graph_breaks"] == 0
        for (ddp_loss, ddp_norm), (loss, norm) in zip(record["ddp"], record["compiled"]):
            assert loss == pytest.approx(ddp_loss, rel=1e-5)
            assert norm == pytest.approx(ddp_norm, rel=1e-4)
