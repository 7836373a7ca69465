"""Our symmetric InfoNCE equals open_clip's `ClipLoss`: forward value and gradients in one
process, and across two gloo processes on 127.0.0.1 with features gathered with gradients.

open_clip's `loss.py` is loaded as a standalone module (it imports only torch): importing the
whole open_clip package costs several seconds in each spawned worker.
"""

from __future__ import annotations

import importlib.util
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from training.methods.clip.loss import ContrastiveLoss
from training.methods.topology.spaces import Euclidean, MultiToken, Oblique, ObliqueGeodesic

WORLD_SIZE = 2
BATCH_PER_RANK, DIM = 4, 8
LOGIT_SCALE = 1 / 0.07


def load_clip_loss_class():
    """open_clip's `ClipLoss`, from its own loss.py, without running open_clip/__init__."""
    package_dir = importlib.util.find_spec("open_clip").submodule_search_locations[0]
    spec = importlib.util.spec_from_file_location("open_clip_loss", os.path.join(package_dir, "loss.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ClipLoss


def make_features(batch: int, dim: int, dtype: torch.dtype, seed: int):
    """(image, text) unit feature rows (batch, dim) and a logit scale, all leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)
    scale = torch.tensor(LOGIT_SCALE, dtype=dtype)
    return image, text, scale


# Non-sphere topologies (kind -> topology on DIM = 8): gathered with gradients like the sphere.
TOPOLOGY_CASES = {
    "oblique": Oblique(4, 2),
    "multi": MultiToken(2, 4),
    "oblique_geodesic": ObliqueGeodesic(4, 2),
    "euclidean": Euclidean(DIM),
}


def make_topology_features(kind: str):
    """The global batch embedded by `kind` (Euclidean rows rescaled: unnormalised)."""
    image, text, scale = make_features(WORLD_SIZE * BATCH_PER_RANK, DIM, torch.float64, seed=3)
    if kind == "euclidean":
        image, text = image * torch.linspace(0.5, 2.0, len(image))[:, None], text * 1.5
    topology = TOPOLOGY_CASES[kind]
    return topology.embed(image), topology.embed(text), scale


def compute_loss_and_grads(loss_fn, image, text, scale, ours: bool):
    """(loss, d/d image, d/d text, d/d scale) of one loss module on fresh leaf copies."""
    image, text, scale = (t.detach().clone().requires_grad_(True) for t in (image, text, scale))
    if ours:
        loss = loss_fn({"image_features": image, "text_features": text, "logit_scale": scale})["contrastive"]
    else:
        loss = loss_fn(image, text, scale)
    grads = torch.autograd.grad(loss, (image, text, scale))
    return (loss.detach(), *grads)


# ---------------------------------------------------------------- one process


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_single_process_matches_clip_loss(dtype, tol, local_loss):
    ClipLoss = load_clip_loss_class()
    image, text, scale = make_features(8, 16, dtype, seed=0)
    ours = compute_loss_and_grads(ContrastiveLoss(local_loss=local_loss), image, text, scale, ours=True)
    theirs = compute_loss_and_grads(ClipLoss(local_loss=local_loss), image, text, scale, ours=False)
    for name, a, b in zip(("loss", "d_image", "d_text", "d_scale"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
    assert ours[0].item() > 0 and all(g.abs().sum() > 0 for g in ours[1:])


def test_aligned_pairs_give_lower_loss_than_random():
    """Sanity of direction: matched pairs (text = image) beat independent features."""
    image, text, scale = make_features(8, 16, torch.float64, seed=1)
    loss = ContrastiveLoss()
    matched = loss({"image_features": image, "text_features": image, "logit_scale": scale})["contrastive"]
    random = loss({"image_features": image, "text_features": text, "logit_scale": scale})["contrastive"]
    assert math.isfinite(random.item()) and matched < random


# ---------------------------------------------------------------- two gloo processes


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gather_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: our loss and ClipLoss on this rank's shard of one global batch, for each
    (gather_with_grad, local_loss); writes per-rank results, plus the feature gradients of
    every rank and the summed logit-scale gradient."""
    import torch.distributed as dist

    ClipLoss = load_clip_loss_class()
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        image, text, scale = make_features(WORLD_SIZE * BATCH_PER_RANK, DIM, torch.float64, seed=2)
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        results = {}
        for with_grad, local_loss in GATHER_MODES:
            ours = compute_loss_and_grads(
                ContrastiveLoss(rank, WORLD_SIZE, gather_with_grad=with_grad, local_loss=local_loss),
                image[rows],
                text[rows],
                scale,
                ours=True,
            )
            theirs = compute_loss_and_grads(
                ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD_SIZE),
                image[rows],
                text[rows],
                scale,
                ours=False,
            )
            results[with_grad, local_loss] = {"ours": ours, "theirs": theirs, **share_gradients(ours)}
        for kind, topology in TOPOLOGY_CASES.items():
            t_image, t_text, t_scale = make_topology_features(kind)
            for local_loss in (False, True):
                ours = compute_loss_and_grads(
                    ContrastiveLoss(rank, WORLD_SIZE, True, local_loss, topology),
                    t_image[rows],
                    t_text[rows],
                    t_scale,
                    ours=True,
                )
                results[kind, True, local_loss] = {"ours": ours, **share_gradients(ours)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def share_gradients(ours) -> dict:
    """Every rank's feature gradients in rank order ((B_global, D) each) and the summed
    logit-scale gradient."""
    import torch.distributed as dist

    all_d_image = [torch.zeros_like(ours[1]) for _ in range(WORLD_SIZE)]
    all_d_text = [torch.zeros_like(ours[2]) for _ in range(WORLD_SIZE)]
    dist.all_gather(all_d_image, ours[1].contiguous())
    dist.all_gather(all_d_text, ours[2].contiguous())
    summed_d_scale = ours[3].clone()
    dist.all_reduce(summed_d_scale)
    return {
        "all_d_image": torch.cat(all_d_image),
        "all_d_text": torch.cat(all_d_text),
        "summed_d_scale": summed_d_scale,
    }


GATHER_MODES = [(True, False), (True, True), (False, False), (False, True)]


@pytest.fixture(scope="module")
def gathered_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(run_gather_worker, args=(find_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def assert_matches_clip_loss(gathered_results, mode):
    for rank, results in enumerate(gathered_results):
        ours, theirs = results[mode]["ours"], results[mode]["theirs"]
        for name, a, b in zip(("loss", "d_image", "d_text", "d_scale"), ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=lambda m, n=name, r=rank: f"rank {r} {n}: {m}")


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_gather_with_grad_matches_clip_loss(gathered_results, local_loss):
    assert_matches_clip_loss(gathered_results, (True, local_loss))


def test_two_process_gather_without_grad_matches_clip_loss(gathered_results):
    assert_matches_clip_loss(gathered_results, (False, False))


def test_two_process_local_loss_without_grad_matches_clip_loss(gathered_results):
    """ClipLoss puts the local differentiable rows back into the no-grad gather only without
    local_loss; doing it with local_loss too adds gradient terms ClipLoss does not have."""
    assert_matches_clip_loss(gathered_results, (False, True))


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_gather_matches_single_process_on_whole_batch(gathered_results, local_loss):
    """How the gathered loss relates to one process holding the whole batch (loss L_full):

    Forward. Without local_loss every rank scores the whole (B_global, B_global) matrix, so
    L_r = L_full on every rank. With local_loss rank r scores only its own B rows against all
    columns; each cross-entropy is a mean over rows, so mean_r L_r = L_full.

    Backward. all_gather's backward (a reduce-scatter of the sum) sums the incoming gradients of
    every rank's copy of slice r and hands the sum to rank r, so the gradient rank r gets for
    its own features is d(sum_r' L_r')/dx_r. sum_r' L_r' = W * L_full in both modes (W
    identical copies without local_loss; W times the mean of the row-blocks with it), hence

        grad on rank r of its own features = W * dL_full/dx_r,   sum_r dL_r/dscale = W * dL_full/dscale.

    The logit scale is not gathered: each rank gets only its own dL_r/dscale. DDP then
    averages parameter gradients over the W ranks, which cancels the factor W: a data-parallel
    step equals the single-process step on the concatenated batch.
    """
    image, text, scale = make_features(WORLD_SIZE * BATCH_PER_RANK, DIM, torch.float64, seed=2)
    full = compute_loss_and_grads(ContrastiveLoss(), image, text, scale, ours=True)
    assert_gathered_equal_full(gathered_results, (True, local_loss), full, local_loss)


@pytest.mark.parametrize("local_loss", [False, True])
@pytest.mark.parametrize("kind", sorted(TOPOLOGY_CASES))
def test_two_process_topology_gather_matches_single_process(gathered_results, kind, local_loss):
    """The same relation for every other topology: its logits go through the gathered rows."""
    image, text, scale = make_topology_features(kind)
    full = compute_loss_and_grads(ContrastiveLoss(topology=TOPOLOGY_CASES[kind]), image, text, scale, ours=True)
    assert_gathered_equal_full(gathered_results, (kind, True, local_loss), full, local_loss)


def assert_gathered_equal_full(gathered_results, mode, full, local_loss: bool) -> None:
    losses = torch.stack([r[mode]["ours"][0] for r in gathered_results])
    if local_loss:
        torch.testing.assert_close(losses.mean(), full[0], rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(losses, full[0].expand(WORLD_SIZE), rtol=1e-10, atol=1e-10)
    for rank, results in enumerate(gathered_results):
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        res = results[mode]
        torch.testing.assert_close(res["ours"][1], WORLD_SIZE * full[1][rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res["ours"][2], WORLD_SIZE * full[2][rows], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res["all_d_image"], WORLD_SIZE * full[1], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res["all_d_text"], WORLD_SIZE * full[2], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(res["summed_d_scale"], WORLD_SIZE * full[3], rtol=1e-10, atol=1e-10)


def test_loss_module_resolves_its_gather_alone():
    """In a fresh interpreter that imports only our loss module (open_clip imports
    torch.distributed.nn for us elsewhere), the gather-with-grad path must resolve, and
    importing it warns nothing (the deprecated torch.distributed.nn all_gather is not used)."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "import torch, training.methods.clip.loss\n"
        "training.methods.clip.loss.all_gather_with_grad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
