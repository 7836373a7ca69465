"""CLIP-PGS's optimal-transport normalisation: the batched Sinkhorn of the paper mode against
POT's single-problem `ot.sinkhorn` image by image and POT's own batched solver, and the
reference mode's batched, sync-free balancing loop against the released loop written out
literally (with its Python `break`)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import ot
import pytest
import torch

from training.methods.pgs.sinkhorn import balance_similarity_reference, normalize_similarity_paper, sinkhorn_plans


def random_similarities(batch: int, n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Cosine similarity matrices (B, n, n) of random vectors: entries in [-1, 1], unit diagonal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, n, 8, generator=g, dtype=dtype), dim=-1)
    return x @ x.transpose(1, 2)


@pytest.mark.parametrize("reg, iters", [(0.1, 50), (0.5, 7), (1.0, 1)])
def test_batched_plans_equal_pot_sinkhorn_image_by_image(reg, iters):
    similarity = random_similarities(5, 16, seed=0)
    plans = sinkhorn_plans(similarity, reg, iters)
    for b in range(len(similarity)):
        expected = ot.sinkhorn(
            np.ones(16) / 16, np.ones(16) / 16, -similarity[b].numpy(), reg, numItermax=iters, stopThr=0.0, warn=False
        )
        np.testing.assert_allclose(plans[b].numpy(), expected, rtol=1e-10, atol=1e-14)


def test_converged_plans_equal_pot_solve_batch():
    similarity = random_similarities(4, 12, seed=1)
    plans = sinkhorn_plans(similarity, 0.2, 3000)
    expected = ot.solve_batch(-similarity, reg=0.2, method="sinkhorn", max_iter=3000, tol=1e-13).plan
    torch.testing.assert_close(plans, expected, rtol=1e-7, atol=1e-12)


def test_paper_normalisation_adds_a_doubly_stochastic_matrix():
    similarity = random_similarities(3, 20, seed=2)
    ones = torch.ones(3, 20, dtype=similarity.dtype)
    errors = []
    for iters in (50, 500, 5000):
        added = normalize_similarity_paper(similarity, 0.1, iters) - similarity  # (B, L, L) = L * plan
        assert (added > 0).all()
        torch.testing.assert_close(added.sum(dim=2), ones)  # rows exact: u is updated last
        errors.append((added.sum(dim=1) - 1).abs().max().item())
    assert errors[0] < 1e-3 and errors[0] > errors[1] > errors[2] and errors[2] < 1e-6  # columns converge


def test_batched_plans_stay_in_float32_on_the_input_device():
    similarity = random_similarities(2, 10, seed=3, dtype=torch.float32)
    plans = sinkhorn_plans(similarity, 0.1, 50)
    assert plans.dtype == torch.float32 and plans.device == similarity.device
    assert torch.isfinite(plans).all()


@pytest.mark.parametrize("reg, iters", [(0.0, 5), (-1.0, 5), (0.1, 0)])
def test_sinkhorn_rejects_bad_settings(reg, iters):
    with pytest.raises(ValueError):
        sinkhorn_plans(random_similarities(1, 4, seed=0), reg, iters)


def released_balancing_loop(similarity: torch.Tensor, iters: int = 50, eps: float = 1e-3) -> torch.Tensor:
    """docs/methods/pgs.md §3 step 4 as written: simultaneous row/column division, stop once every
    sum of the batch is within eps of 1."""
    matrix = similarity.clone()
    for _ in range(iters):
        cols, rows = matrix.sum(dim=-2, keepdim=True), matrix.sum(dim=-1, keepdim=True)
        if ((cols - 1).abs() < eps).all() and ((rows - 1).abs() < eps).all():
            break
        matrix = matrix / (cols + eps) / (rows + eps)
    return matrix


def test_reference_loop_equals_the_released_loop_on_raw_cosines():
    similarity = random_similarities(6, 16, seed=4, dtype=torch.float32)
    torch.testing.assert_close(
        balance_similarity_reference(similarity), released_balancing_loop(similarity), rtol=0, atol=0
    )


def doubly_stochastic(n: int, seed: int) -> torch.Tensor:
    """A mixture of permutation matrices: every row and column sums to 1."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n, dtype=torch.float64)
    return sum(w * eye[torch.randperm(n, generator=g)] for w in (0.5, 0.3, 0.2))


def test_reference_loop_stops_for_the_whole_batch_as_the_released_loop_breaks():
    balanced = torch.stack([doubly_stochastic(8, seed) for seed in range(3)])  # (3, 8, 8)
    assert torch.equal(balance_similarity_reference(balanced), balanced)  # stops at once
    g = torch.Generator().manual_seed(5)
    mixed = balanced.clone()
    mixed[2] = torch.rand(8, 8, generator=g, dtype=torch.float64) + 0.05
    for iters in (1, 3, 50):  # one unbalanced image keeps the whole batch going
        result = balance_similarity_reference(mixed, iters)
        torch.testing.assert_close(result, released_balancing_loop(mixed, iters), rtol=0, atol=0)
        assert not torch.equal(result[0], balanced[0])


def test_reference_loop_is_the_simultaneous_update_which_does_not_balance():
    # Dividing by row and column sums of the same iterate maps constant sums s to about
    # 1 / s: a positive matrix oscillates instead of converging (a quirk kept on purpose).
    g = torch.Generator().manual_seed(6)
    positive = torch.rand(2, 8, 8, generator=g, dtype=torch.float64) + 0.05
    sums = balance_similarity_reference(positive, 50).sum(dim=1)
    assert ((sums - 1).abs() > 1e-2).all()


def test_pot_is_imported_without_its_gpu_array_backends():
    # JAX, when installed, preallocates most of the GPU on import; POT would import it.
    code = (
        "import os; os.environ['POT_BACKEND_DISABLE_CUPY'] = ''; "
        "import training.methods.pgs.sinkhorn, ot.backend as b; "
        "print(os.environ['POT_BACKEND_DISABLE_JAX'], os.environ['POT_BACKEND_DISABLE_TENSORFLOW'], "
        "repr(os.environ['POT_BACKEND_DISABLE_CUPY']), sorted(type(x).__name__ for x in b.get_backend_list()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1", "''", "['NumpyBackend',", "'TorchBackend']"]
