"""The per-worker training loop: a page long, free of Ray. It takes an iterable of prepared
batches and a report callback, so a test can hand it a list."""

from __future__ import annotations

import bisect
import functools
import itertools
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from training.accumulation import accumulate_backward
from training.auxiliary import parts_of, update_parts
from training.batches import EDGE_SCORES, IMAGES, SHORT_TEXTS, TEXTS
from training.checkpoint import unwrap
from training.collectives import sum_over_workers
from training.methods.longclip.positions import zero_frozen_rows
from training.compilation import compile_metrics
from training.precision import MasterWeights, upcast_outputs
from training.sharding import average_replicated_gradients, clip_gradients, is_sharded
from training.transforms import normalize_image_tensor


@dataclass(frozen=True)
class LoopSettings:
    start_step: int
    total_steps: int
    seed: int
    rank: int
    world_size: int
    device: torch.device
    log_every: int = 10
    checkpoint_every: int = 200
    grad_clip_norm: float = 1.0
    bf16: bool = False  # autocast to bfloat16 (GPU)
    # The auxiliary parts' update under bfloat16 autocast (run.precision=bf16, whose model computes
    # in bfloat16 on its own, through master weights or FSDP, and hands the parts float32 outputs)
    parts_bf16: bool = False
    epoch_steps: tuple[int, ...] = ()  # steps of each epoch of the schedule (CLIP-PGS's alpha)
    accum_freq: int = 1  # micro-batches per step (training/accumulation.py)
    eval_every: int = 0  # in-run evaluation period in steps (and at the last step); 0: none


class MetricMeter:
    """Sums over a logging window; `summary` divides once, with every worker's numerators and
    denominators summed first (throughput, data wait and a loss term computed per worker are
    then the whole group's, not rank 0's)."""

    def __init__(self):
        self.sums = defaultdict(float)
        self.count = 0
        self.window_start = time.perf_counter()
        self.wait_s = 0.0
        self.samples = 0

    def update(self, values: dict, samples: int, wait_s: float) -> None:
        for k, v in values.items():
            self.sums[k] += v
        self.count, self.samples, self.wait_s = self.count + 1, self.samples + samples, self.wait_s + wait_s

    def summary(self, world_size: int, device: torch.device | None = None) -> dict:
        """Means over the window and over workers; samples_per_s is the group's (the summed
        samples over the workers' mean window), data_wait_fraction the summed wait over the
        summed window time."""
        keys = sorted(self.sums)
        totals = [self.sums[k] for k in keys] + [
            self.count,
            self.samples,
            self.wait_s,
            time.perf_counter() - self.window_start,
        ]
        reduced = world_size > 1 and dist.is_available() and dist.is_initialized()
        if reduced:
            totals = sum_over_workers(keys, totals, device or torch.device("cpu"))
        # float() here, once per window: the step itself never waits on the device.
        *sums, count, samples, wait_s, elapsed = (float(v) for v in totals)
        out = {k: v / max(count, 1) for k, v in zip(keys, sums)}
        # without a process group (one worker, or a test's process standing for several) this
        # worker's figures stand for every worker's
        group_samples, window_s = (samples, elapsed / world_size) if reduced else (samples * world_size, elapsed)
        out["samples_per_s"] = group_samples / max(window_s, 1e-9)
        out["data_wait_fraction"] = wait_s / max(elapsed, 1e-9)
        return out


def seed_step(model, seed: int, step: int, rank: int, micro: int | None = None) -> None:
    """Reseed the model's own random draws (patch masks) from (seed, step, rank), and the
    micro-batch under gradient accumulation."""
    entropy = [seed, step, rank] + ([] if micro is None else [micro])
    for module in unwrap(model).modules():
        if hasattr(module, "generator"):
            device = next(unwrap(model).parameters()).device
            state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
            module.generator = torch.Generator(device=device).manual_seed(int(state) >> 1)


def compute_epoch_fraction(step: int, epoch_steps: tuple[int, ...]) -> float:
    """epoch / epochs of the step (0-based epoch; 0.0 without an epoch plan)."""
    if not epoch_steps:
        return 0.0
    epoch = bisect.bisect_right(list(itertools.accumulate(epoch_steps)), step)
    return min(epoch, len(epoch_steps) - 1) / len(epoch_steps)


def device_inputs(batch: dict, device: torch.device) -> dict:
    """The model's keyword inputs from a prepared batch, on the device; images in float32
    whatever the precision (the model casts them for its towers: PGS selects from the pixels,
    and bfloat16 pixels would move about half its choices)."""
    inputs = {"images": normalize_image_tensor(torch.as_tensor(batch[IMAGES]).to(device, non_blocking=True))}
    for name, column in (("texts", TEXTS), ("short_texts", SHORT_TEXTS), ("edge_scores", EDGE_SCORES)):
        if batch.get(column) is not None:
            inputs[name] = torch.as_tensor(batch[column]).to(device, non_blocking=True)
    return inputs


def finish_gradients(master, max_norm: float) -> torch.Tensor:
    """The reduced gradients' last changes before the update, -> their norm before clipping:
    FSDP's replicated ones averaged, declared frozen rows zeroed, the global norm clipped."""
    sharded = is_sharded(master)
    if sharded:  # FSDP reduced the sharded gradients already
        average_replicated_gradients(master)
    zero_frozen_rows(master)  # Long-CLIP's kept positions
    if sharded:
        return clip_gradients(master.parameters(), max_norm)
    return torch.nn.utils.clip_grad_norm_(master.parameters(), max_norm)


def train_step(
    model,
    objective,
    optimizer,
    scheduler,
    batch: dict,
    s: LoopSettings,
    epoch_fraction: float = 0.0,
    step: int | None = None,
    weights: MasterWeights | None = None,
) -> dict:
    """One step: the model's forward, the objective's auxiliary parts' own updates (each
    detaches what it reads of the step's outputs), then the encoders' backward and optimiser
    step. `step` (0-based) is required with auxiliary parts: their draws and schedules use it.
    With `weights` (run.precision=bf16) `model` is the bfloat16 compute copy and the optimiser
    steps the float32 masters."""
    parts = parts_of(objective)
    if parts and step is None:
        raise ValueError("train_step: an objective with auxiliary parts needs the step number")
    inputs = device_inputs(batch, s.device)
    extras = {"inputs": {k: v for k, v in inputs.items() if k != "edge_scores"}, "step": step}
    autocast = functools.partial(torch.autocast, device_type=s.device.type, dtype=torch.bfloat16, enabled=s.bf16)

    def update(outputs: dict) -> dict:
        # The auxiliary parts in the step's precision (a frozen tower's forward in bfloat16 under
        # amp_bf16 and bf16 alike; a part may turn autocast off for its own numerics, as CIBR's
        # estimators do).
        with autocast(enabled=s.bf16 or s.parts_bf16):
            return update_parts(parts, outputs)

    def forward(module, micro_inputs: dict) -> dict:
        outputs = module(**micro_inputs, epoch_fraction=epoch_fraction)
        return upcast_outputs(outputs) if weights else outputs

    optimizer.zero_grad(set_to_none=True)
    if s.accum_freq > 1:
        if step is None:
            raise ValueError("train_step: gradient accumulation needs the step number (its draws use it)")
        terms, loss, outputs, part_metrics = accumulate_backward(
            model,
            objective,
            update,
            inputs,
            s.accum_freq,
            forward,
            lambda j: seed_step(model, s.seed, step, s.rank, j),
            extras,
            autocast,
        )
    else:
        with autocast():
            outputs = forward(model, inputs)
            outputs.update(extras)
            part_metrics = update(outputs)
            terms = objective(outputs)
        loss = sum(terms.values())
        loss.backward()
    master = unwrap(model) if weights is None else weights.master
    if weights is not None:
        weights.grads_to_master()
    grad_norm = finish_gradients(master, s.grad_clip_norm)
    lr = optimizer.param_groups[0]["lr"]  # the rate this step used
    optimizer.step()
    scheduler.step()
    master.clamp_logit_scale()
    if weights is not None:
        weights.master_to_compute()
    scale = master.tower.logit_scale.detach().exp()
    # Detached device tensors, no .item(): a host synchronisation per step would stall the GPU.
    return {
        **{f"loss/{k}": v.detach() for k, v in terms.items()},
        "loss/total": loss.detach(),
        "logit_scale": scale,
        "temperature": 1.0 / scale,
        "grad_norm": grad_norm.detach(),
        "lr": lr,
        **part_metrics,
        **outputs.get("diagnostics", {}),
        **{k: v for k, v in outputs.items() if k.startswith("masking/")},
    }


def wants_evaluation(step: int, s: LoopSettings) -> bool:
    return s.eval_every > 0 and (step % s.eval_every == 0 or step == s.total_steps)


def run_training(
    model,
    objective,
    optimizer,
    scheduler,
    batches: Iterable[dict],
    s: LoopSettings,
    report: Callable[[int, dict, bool], None],
    weights: MasterWeights | None = None,
    evaluate: Callable | None = None,
) -> None:
    """Train from s.start_step to s.total_steps. `report(step, metrics, checkpoint)` is
    called every log_every steps and at checkpoints (checkpoint=True), including the last.
    With `evaluate` (training/in_run_eval.py) every worker runs `evaluate(model)` every
    s.eval_every steps and at the last step, after the window's figures are taken (its time
    is not training throughput), and the step's report carries its metrics and eval/seconds."""
    model.train()
    meter = MetricMeter()
    step = s.start_step
    batch_iter = iter(batches)
    while step < s.total_steps:
        wait_start = time.perf_counter()
        batch = next(batch_iter)
        wait_s = time.perf_counter() - wait_start
        if s.accum_freq == 1:  # accumulation reseeds per micro-batch
            seed_step(model, s.seed, step, s.rank)
        metrics = train_step(
            model, objective, optimizer, scheduler, batch, s, compute_epoch_fraction(step, s.epoch_steps), step, weights
        )
        meter.update(metrics, len(batch[IMAGES]), wait_s)
        step += 1
        is_last = step == s.total_steps
        want_ckpt = is_last or step % s.checkpoint_every == 0
        want_eval = evaluate is not None and wants_evaluation(step, s)
        if want_ckpt or want_eval or step % s.log_every == 0:
            summary = {**meter.summary(s.world_size, s.device), **compile_metrics()}
            if want_eval:
                summary.update(timed_evaluation(evaluate, model))
            report(step, summary, want_ckpt)
            meter = MetricMeter()


def timed_evaluation(evaluate: Callable, model) -> dict:
    start = time.perf_counter()
    metrics = evaluate(model)
    return {**metrics, "eval/seconds": time.perf_counter() - start}
