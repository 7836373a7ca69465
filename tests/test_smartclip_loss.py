"""SmartCLIP's modular contrastive loss against the naive per-pair computation (Eqs. 3-7, 9):
the two-matmul masked cosine, the loss, and their gradients, with an all-zero mask among
the texts; all-ones masks reduce it to (twice) the CLIP loss; and across two gloo processes
with features and masks gathered with gradients."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.conftest import free_port
from training.methods.clip.loss import ContrastiveLoss
from training.methods.smartclip.loss import EPS, ModularContrastiveLoss, compute_masked_cosine, compute_sparsity

B, D, SCALE = 8, 16, 100.0
WORLD_SIZE, BATCH_PER_RANK = 2, 4


def make_inputs(batch: int, dim: int, seed: int, zero_mask_row: int | None = 3):
    """Raw image features, unit text features, binary masks (one row all zero)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(batch, dim, generator=g, dtype=torch.float64), dim=-1)
    masks = (torch.rand(batch, dim, generator=g) < 0.6).to(torch.float64)
    if zero_mask_row is not None:
        masks[zero_mask_row] = 0
    return image, text, masks


def naive_masked_cosine(image, text, masks, linear_norm: bool = True):
    """Per pair: S[a, b] = (z_a ⊙ m_b)·t_b / sqrt(‖z_a ⊙ m_b‖² + eps). With `linear_norm`
    the squared norm is written Σ z² m (the straight-through form; equal for 0/1 masks)."""
    rows = []
    for a in range(image.shape[0]):
        row = []
        for b in range(text.shape[0]):
            masked = image[a] * masks[b]
            norm_sq = (image[a] ** 2 * masks[b]).sum() if linear_norm else (masked**2).sum()
            row.append((masked * text[b]).sum() / torch.sqrt(norm_sq + EPS))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def naive_modular_loss(image, text, masks, scale, lambda_align=1.0, lambda_sparsity=0.0):
    """Eq. 6 (image i against every text j, each with its own mask) + Eq. 7 (text i against
    every image j, all masked by text i's mask), written as explicit log-sum-exps."""
    n = image.shape[0]
    S = scale * naive_masked_cosine(image, text, masks)
    ctr_i = sum(-(S[i, i] - torch.logsumexp(S[i, :], dim=0)) for i in range(n)) / n
    ctr_t = sum(-(S[i, i] - torch.logsumexp(S[:, i], dim=0)) for i in range(n)) / n
    sparsity = sum(masks[i].abs().sum() for i in range(n)) / n
    return lambda_align * (ctr_i + ctr_t) + lambda_sparsity * sparsity


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def test_masked_cosine_equals_per_pair_cosine():
    image, text, masks = make_inputs(B, D, seed=0)
    fast = compute_masked_cosine(image, text, masks)
    literal = torch.stack(
        [
            torch.stack([F.cosine_similarity(image[a] * masks[b], text[b], dim=0, eps=1e-30) for b in range(B)])
            for a in range(B)
        ]
    )
    nonzero = masks.sum(1) > 0
    # eps = 1e-8 under the root: relative effect eps / (2 ‖z ⊙ m‖²), far below 1e-6 here.
    torch.testing.assert_close(fast[:, nonzero], literal[:, nonzero], rtol=1e-6, atol=1e-9)
    assert torch.all(fast[:, ~nonzero] == 0) and torch.isfinite(fast).all()


def test_masked_cosine_gradients_match_naive():
    image, text, masks = make_inputs(B, D, seed=1)
    weights = torch.randn(B, B, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    fast_in, naive_in = leaves(image, text, masks), leaves(image, text, masks)
    fast_grads = torch.autograd.grad((compute_masked_cosine(*fast_in) * weights).sum(), fast_in)
    naive_grads = torch.autograd.grad((naive_masked_cosine(*naive_in) * weights).sum(), naive_in)
    for name, a, b in zip(("image", "text", "masks"), fast_grads, naive_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d_{n}: {m}")
    assert torch.all(fast_grads[1][3] == 0)  # text with an all-zero mask: no gradient to it


def test_image_and_text_gradients_equal_the_literal_norm():
    """For image and text the straight-through choice of norm does not matter."""
    image, text, masks = make_inputs(B, D, seed=2)
    a_in, b_in = leaves(image, text), leaves(image, text)
    grads_a = torch.autograd.grad(naive_masked_cosine(*a_in, masks).sum(), a_in)
    grads_b = torch.autograd.grad(naive_masked_cosine(*b_in, masks, linear_norm=False).sum(), b_in)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("local_loss", [False, True])
def test_modular_loss_matches_naive_forward_and_backward(local_loss):
    image, text, masks = make_inputs(B, D, seed=3)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    loss_fn = ModularContrastiveLoss(lambda_align=0.7, lambda_sparsity=0.01, local_loss=local_loss)
    fast_in, naive_in = leaves(image, text, masks, scale), leaves(image, text, masks, scale)
    terms = loss_fn(
        {"image_features": fast_in[0], "text_features": fast_in[1], "text_masks": fast_in[2], "logit_scale": fast_in[3]}
    )
    fast = terms["align"] + terms["sparsity"]
    naive = naive_modular_loss(*naive_in, lambda_align=0.7, lambda_sparsity=0.01)
    torch.testing.assert_close(fast, naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms["sparsity"], 0.01 * masks.sum() / B, rtol=1e-12, atol=0)
    for name, a, b in zip(
        ("image", "text", "masks", "scale"), torch.autograd.grad(fast, fast_in), torch.autograd.grad(naive, naive_in)
    ):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m, n=name: f"d_{n}: {m}")


def test_all_ones_masks_give_twice_the_clip_loss():
    """Eq. 9 sums L_ctrI and L_ctrT where CLIP averages them."""
    image, text, _ = make_inputs(B, D, seed=4, zero_mask_row=None)
    scale = torch.tensor(SCALE, dtype=torch.float64)
    ones = torch.ones(B, D, dtype=torch.float64)
    modular = ModularContrastiveLoss(1.0, 0.0)(
        {"image_features": image, "text_features": text, "text_masks": ones, "logit_scale": scale}
    )["align"]
    clip = ContrastiveLoss()(
        {"image_features": F.normalize(image, dim=-1), "text_features": text, "logit_scale": scale}
    )["contrastive"]
    torch.testing.assert_close(modular, 2 * clip, rtol=1e-7, atol=1e-9)


def test_sparsity_is_the_unnormalised_l1_batch_mean():
    masks = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert compute_sparsity(masks).item() == 1.5


# ---------------------------------------------------------------- two gloo processes


def run_gather_worker(rank: int, port: int, out_dir: str) -> None:
    """One rank: the modular loss on its shard of one global batch (gather with gradients,
    with and without local_loss); saves loss and gradients of its own inputs."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        image, text, masks = make_inputs(WORLD_SIZE * BATCH_PER_RANK, D, seed=5)
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        results = {}
        for local_loss in (False, True):
            inputs = leaves(image[rows], text[rows], masks[rows], torch.tensor(SCALE, dtype=torch.float64))
            loss_fn = ModularContrastiveLoss(1.0, 0.0, rank, WORLD_SIZE, gather_with_grad=True, local_loss=local_loss)
            loss = loss_fn(
                {
                    "image_features": inputs[0],
                    "text_features": inputs[1],
                    "text_masks": inputs[2],
                    "logit_scale": inputs[3],
                }
            )["align"]
            results[local_loss] = (loss.detach(), *torch.autograd.grad(loss, inputs))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("modular_gather")
    mp.spawn(run_gather_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("local_loss", [False, True])
def test_two_process_gather_matches_naive_on_whole_batch(gathered_results, local_loss):
    """Same relation as for the CLIP loss (tests/test_contrastive_loss.py): without local_loss
    each rank's loss is the whole-batch loss, with it their mean is; each rank's feature and
    mask gradients are W times the whole-batch ones (all_gather's backward sums every rank's
    copy), and the logit-scale gradients sum to W times the whole-batch one."""
    image, text, masks = make_inputs(WORLD_SIZE * BATCH_PER_RANK, D, seed=5)
    inputs = leaves(image, text, masks, torch.tensor(SCALE, dtype=torch.float64))
    full_loss = naive_modular_loss(*inputs)
    full_grads = torch.autograd.grad(full_loss, inputs)
    losses = torch.stack([r[local_loss][0] for r in gathered_results])
    expected = full_loss.detach()
    torch.testing.assert_close(
        losses.mean() if local_loss else losses,
        expected if local_loss else expected.expand(WORLD_SIZE),
        rtol=1e-10,
        atol=1e-10,
    )
    for rank, results in enumerate(gathered_results):
        rows = slice(rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)
        for index in range(3):
            torch.testing.assert_close(
                results[local_loss][1 + index], WORLD_SIZE * full_grads[index][rows], rtol=1e-9, atol=1e-11
            )
    summed_scale = sum(r[local_loss][4] for r in gathered_results)
    torch.testing.assert_close(summed_scale, WORLD_SIZE * full_grads[3], rtol=1e-9, atol=1e-11)
