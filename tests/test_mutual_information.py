"""The MI estimators CIBR minimises (training/methods/cibr/mutual_information.py), against closed
forms: correlated Gaussians, I = −½ Σ log(1 − ρ²), and a linear-Gaussian chain for the
conditional MI. Each estimator is trained on fresh batches and scored on 100 k fresh samples."""

from __future__ import annotations

import math

import pytest
import torch

from training.methods.cibr.mutual_information import (
    ConditionalMI,
    Mine,
    build_estimator,
    derangement,
    log_mean_exp,
)

DIM, STEPS, BATCH, LR, HIDDEN = 5, 800, 512, 3e-3, 64


def correlated_gaussians(n: int, rho: float, generator: torch.Generator):
    """(z, x) with z_j = ρ x_j + √(1 − ρ²) ε_j, coordinates independent."""
    x = torch.randn(n, DIM, generator=generator)
    return rho * x + math.sqrt(1 - rho**2) * torch.randn(n, DIM, generator=generator), x


def gaussian_mi(rho: float) -> float:
    return -0.5 * DIM * math.log(1 - rho**2)


def train_estimator(module, sample, seed: int, steps: int = STEPS):
    """Maximise the estimator's objective on fresh batches of `sample(n, generator)`, updating
    its moving average after each step as the CIBR loop does; returns the 100 k-sample value."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
        *blocks, perm = *sample(BATCH, generator), derangement(BATCH, generator)
        estimate = module(*blocks, perm)
        objective = sum(e.objective for e in estimate) if isinstance(estimate, tuple) else estimate.objective
        optimizer.zero_grad()
        (-objective).backward()
        optimizer.step()
        schedule.step()
        module.update_ema(*blocks, perm)
    with torch.no_grad():
        *blocks, perm = *sample(100_000, generator), derangement(100_000, generator)
        estimate = module(*blocks, perm)
    return ConditionalMI.combine(estimate).value.item() if isinstance(estimate, tuple) else estimate.value.item()


class _Pair(torch.nn.Module):
    """(z, x, perm) -> the estimator's (z, (x,), perm) call."""

    def __init__(self, estimator):
        super().__init__()
        self.estimator = estimator

    def forward(self, z, x, perm):
        return self.estimator(z, (x,), perm)

    def update_ema(self, z, x, perm):
        self.estimator.update_ema(z, (x,), perm)


def trained_pair_estimate(kind: str, rho: float, seed: int) -> float:
    torch.manual_seed(seed)
    module = _Pair(build_estimator(kind, (DIM, DIM), hidden=HIDDEN))
    return train_estimator(module, lambda n, g: correlated_gaussians(n, rho, g), seed)


@pytest.mark.parametrize("kind", ["mine", "mine_f"])
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_lower_bound_estimators_recover_the_gaussian_mi(kind, rho):
    truth = gaussian_mi(rho)
    estimates = [trained_pair_estimate(kind, rho, seed) for seed in range(3)]
    for estimate in estimates:
        assert abs(estimate - truth) < 0.05 * truth, (estimates, truth)


@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_club_lies_above_the_gaussian_mi_at_its_own_closed_form(rho):
    """With q(z | x) fitted to the true conditional N(ρx, 1 − ρ²), CLUB's bound is
    E_joint[log q] − E_marg[log q] = Σ ρ² / (1 − ρ²), above the MI for every ρ."""
    estimate = trained_pair_estimate("club", rho, seed=0)
    assert estimate > gaussian_mi(rho) * 1.5
    assert abs(estimate - DIM * rho**2 / (1 - rho**2)) < 0.05 * DIM * rho**2 / (1 - rho**2)


def test_chain_rule_recovers_a_conditional_mi_in_closed_form():
    """c ~ N(0, I), x = ρc + √(1 − ρ²)ε₁, z = x + c + σε₂ (3 coordinates): given c, z is x plus
    noise, so I(Z; X | C) = ½ Σ log((1 − ρ² + σ²) / σ²)."""
    rho, sigma, dim = 0.6, 0.8, 3

    def sample(n, g):
        c = torch.randn(n, dim, generator=g)
        x = rho * c + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=g)
        return x + c + sigma * torch.randn(n, dim, generator=g), x, c

    truth = dim / 2 * math.log((1 - rho**2 + sigma**2) / sigma**2)
    estimate = train_estimator(ConditionalMI("mine", dim, dim, dim, hidden=HIDDEN), sample, seed=0, steps=1000)
    assert abs(estimate - truth) < 0.1 * truth, (estimate, truth)


def test_derangement_has_no_fixed_point_and_is_a_permutation():
    generator = torch.Generator().manual_seed(0)
    for n in (2, 3, 17, 256):
        perm = derangement(n, generator)
        assert sorted(perm.tolist()) == list(range(n))
        assert not (perm == torch.arange(n)).any()
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_mine_value_is_the_dv_bound_and_its_gradient_the_ema_corrected_one():
    """Value: mean T(joint) − log mean exp T(marginal). Gradient (w.r.t. z, what the encoders
    follow): ∇ mean T(joint) − ∇ mean exp T(marginal) / μ with μ the moving average."""
    torch.manual_seed(0)
    mine = Mine((3, 2), hidden=8, ema_rate=0.25)
    z, x = torch.randn(6, 3), torch.randn(6, 2)
    perm = derangement(6, torch.Generator().manual_seed(1))
    mine.update_ema(z, (x,), perm)  # μ₀: the first batch's value
    first = log_mean_exp(mine.network(z[perm], x)).detach()
    assert torch.allclose(mine.log_mu, first)
    z2 = torch.randn(6, 3)
    mine.update_ema(z2, (x,), perm)
    second = log_mean_exp(mine.network(z2[perm], x)).detach()
    assert torch.allclose(mine.log_mu, torch.log(0.75 * first.exp() + 0.25 * second.exp()))

    zq = torch.randn(6, 3, requires_grad=True)
    estimate = mine(zq, (x,), perm)
    joint, marginal = mine.network(zq, x), mine.network(zq[perm], x)
    assert torch.allclose(estimate.value, joint.mean() - torch.log(marginal.exp().mean()))
    (grad,) = torch.autograd.grad(estimate.value, zq)
    zr = zq.detach().clone().requires_grad_(True)
    reference = mine.network(zr, x).mean() - mine.network(zr[perm], x).exp().mean() / mine.log_mu.exp()
    (expected,) = torch.autograd.grad(reference, zr)
    assert torch.allclose(grad, expected, atol=1e-6)


def test_block_norm_starts_at_zero_mean_unit_variance_and_is_then_fixed_parameters():
    torch.manual_seed(0)
    mine = Mine((4, 4), hidden=8)
    norm = mine.network.norms[1]
    x = 3 + 5 * torch.randn(1000, 4)
    std, mean = torch.std_mean(norm(x), dim=0)
    assert torch.allclose(mean, torch.zeros(4), atol=1e-4) and torch.allclose(std, torch.ones(4), atol=1e-4)
    before = norm.shift.detach().clone()
    norm(torch.randn(10, 4))
    assert torch.equal(norm.shift, before)
    assert {"norms.1.shift", "norms.1.log_scale", "norms.1.initialised"} <= set(mine.network.state_dict())


def test_a_loaded_estimator_keeps_its_started_state():
    """The host-side mirrors of the 'started' buffers follow a loaded state dict: a restored
    MINE keeps its moving average and its inputs' affine instead of re-initialising them."""
    torch.manual_seed(0)
    mine, z, x = Mine((3, 2), hidden=8), torch.randn(6, 3), torch.randn(6, 2)
    perm = derangement(6, torch.Generator().manual_seed(1))
    mine.update_ema(z, (x,), perm)
    restored = Mine((3, 2), hidden=8)
    restored.load_state_dict(mine.state_dict())
    assert restored.started and all(norm.started for norm in restored.network.norms)
    assert torch.equal(restored(z, (x,), perm).objective, mine(z, (x,), perm).objective)
    fresh = Mine((3, 2), hidden=8)
    assert not fresh.started and not fresh.network.norms[0].started


def test_unknown_estimator_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown MI estimator 'infonce'"):
        build_estimator("infonce", (2, 2))
