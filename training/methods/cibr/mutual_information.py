"""Neural mutual-information estimators for CIBR (docs/methods/cibr.md §2): MINE with the EMA bias
correction (Belghazi et al. 2018, the Donsker-Varadhan bound), MINE-f (the unbiased NWJ / f-GAN
bound of the same paper) and CLUB (Cheng et al. 2020, a variational upper bound), and the chain
rule that turns a conditional MI into two ordinary ones:

    I(Z; X | C) = I(Z; [X, C]) − I(Z; C).

An estimator scores (z, x₁, x₂, ...) against the product of marginals made by shuffling only
the z side with a derangement π, so the (x₁, x₂, ...) rows stay paired (what the chain rule
needs). Each returns an `MIEstimate`: `value` is the estimate, carrying the gradient the
encoders should follow (for MINE the bias-corrected one), and `objective` is what the
estimator's own parameters maximise. The estimators are pure modules: rank, device and the
optimiser belong to whoever owns them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

ESTIMATOR_KINDS = ("mine", "mine_f", "club")


@dataclass
class MIEstimate:
    value: torch.Tensor  # () the MI estimate, in nats; its gradient is the encoders'
    objective: torch.Tensor  # () what the estimator's parameters maximise


def derangement(
    batch_size: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """A random permutation with no fixed point: one cycle through a random order of the rows
    (batch_size ≥ 2), so every z is paired with another sample's x."""
    if batch_size < 2:
        raise ValueError(f"a derangement needs at least 2 rows, got {batch_size}")
    order = torch.randperm(batch_size, generator=generator, device=device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)  # order[i] -> order[i + 1]
    return perm


def log_mean_exp(values: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(values, dim=0) - math.log(values.shape[0])


class StartedOnce(nn.Module):
    """A module with a one-time start (a data-dependent initialisation) kept as a boolean
    buffer, so it is checkpointed, and mirrored on the host, so a forward branches on it
    without a device synchronisation every step; the mirror is re-read once on load."""

    def __init__(self, flag: str):
        super().__init__()
        self.flag = flag
        self.started = False
        self.register_buffer(flag, torch.zeros((), dtype=torch.bool))

    def mark_started(self) -> None:
        getattr(self, self.flag).fill_(True)
        self.started = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.started = bool(getattr(self, self.flag))


class BlockNorm(StartedOnce):
    """A learned per-feature affine map, initialised from the first batch it sees to zero mean
    and unit variance (Glow's ActNorm). It puts blocks of very different scales (unit-norm Z,
    a frozen tower's pre-projection features) on one footing without LayerNorm's loss of each
    row's mean and norm, which for a few dimensions is a large share of the information."""

    def __init__(self, dim: int):
        super().__init__("initialised")
        self.shift = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.started:
            with torch.no_grad():
                std, mean = torch.std_mean(x.detach().float(), dim=0)
                self.shift.copy_(-mean)
                self.log_scale.copy_(-torch.log(std + 1e-6))
                self.mark_started()
        return (x + self.shift) * self.log_scale.exp()


class StatisticsNetwork(nn.Module):
    """T(z, x₁, ...): each input block through its own BlockNorm, then Linear → hidden → ELU →
    Linear → hidden → ELU → Linear → 1, soft-clamped to ±clamp (clamp·tanh(T / clamp))."""

    def __init__(self, dims: Sequence[int], hidden: int = 512, clamp: float = 20.0):
        super().__init__()
        self.norms = nn.ModuleList(BlockNorm(d) for d in dims)
        self.mlp = nn.Sequential(
            nn.Linear(sum(dims), hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, 1)
        )
        self.clamp = clamp

    def forward(self, *blocks: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([norm(block) for norm, block in zip(self.norms, blocks)], dim=-1)
        return self.clamp * torch.tanh(self.mlp(inputs).squeeze(-1) / self.clamp)  # (B,)


class Mine(StartedOnce):
    """The Donsker-Varadhan bound Î = E_joint[T] − log E_marg[e^T]. Its minibatch gradient is
    biased; the corrected one replaces the denominator by a moving average μ of E_marg[e^T]
    (kept as log μ, initialised with the first batch): ∇E_joint[T] − ∇E_marg[e^T] / μ."""

    def __init__(self, dims: Sequence[int], hidden: int = 512, ema_rate: float = 0.01):
        super().__init__("ema_started")
        self.network = StatisticsNetwork(dims, hidden)
        self.ema_rate = ema_rate
        self.register_buffer("log_mu", torch.zeros(()))

    def forward(self, z: torch.Tensor, xs: Sequence[torch.Tensor], perm: torch.Tensor) -> MIEstimate:
        joint = self.network(z, *xs).mean()
        log_marg = log_mean_exp(self.network(z[perm], *xs))
        log_mu = self.log_mu if self.started else log_marg.detach()
        corrected = joint - torch.exp(log_marg - log_mu)  # gradient: the bias-corrected one
        value = joint - log_marg
        return MIEstimate(value.detach() + corrected - corrected.detach(), corrected)

    @torch.no_grad()
    def update_ema(self, z: torch.Tensor, xs: Sequence[torch.Tensor], perm: torch.Tensor) -> None:
        """μ ← (1 − α)·μ + α·E_marg[e^T], in log space; call once per estimator step."""
        log_marg = log_mean_exp(self.network(z[perm], *xs))
        if not self.started:
            self.log_mu.copy_(log_marg)
            self.mark_started()
            return
        self.log_mu.copy_(torch.logaddexp(self.log_mu + math.log1p(-self.ema_rate), log_marg + math.log(self.ema_rate)))


class MineF(nn.Module):
    """MINE-f: the f-divergence (NWJ) bound E_joint[T] − E_marg[e^(T − 1)], unbiased on
    minibatches, so no moving average."""

    def __init__(self, dims: Sequence[int], hidden: int = 512):
        super().__init__()
        self.network = StatisticsNetwork(dims, hidden)

    def forward(self, z: torch.Tensor, xs: Sequence[torch.Tensor], perm: torch.Tensor) -> MIEstimate:
        bound = self.network(z, *xs).mean() - torch.exp(self.network(z[perm], *xs) - 1).mean()
        return MIEstimate(bound, bound)

    def update_ema(self, *_) -> None:
        pass


class Club(nn.Module):
    """CLUB's sampled upper bound E_joint[log q(z | x)] − E_marg[log q(z | x)] with a diagonal
    Gaussian q(z | x) = N(μ(x), diag σ²(x)); the estimator maximises the joint log-likelihood
    (fitting q), the encoders follow the bound."""

    def __init__(self, dims: Sequence[int], hidden: int = 512):
        super().__init__()
        z_dim = dims[0]
        x_dims = dims[1:]
        self.norms = nn.ModuleList(BlockNorm(d) for d in x_dims)
        self.trunk = nn.Sequential(nn.Linear(sum(x_dims), hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU())
        self.mean = nn.Linear(hidden, z_dim)
        self.log_var = nn.Linear(hidden, z_dim)

    def forward(self, z: torch.Tensor, xs: Sequence[torch.Tensor], perm: torch.Tensor) -> MIEstimate:
        hidden = self.trunk(torch.cat([norm(x) for norm, x in zip(self.norms, xs)], dim=-1))
        mean, log_var = self.mean(hidden), self.log_var(hidden).clamp(-10, 10)  # (B, Dz)

        def log_q(values):  # (B,) log-density of `values` under each row's q, constants dropped
            return (-((values - mean) ** 2) / (2 * log_var.exp()) - log_var / 2).sum(-1)

        joint = log_q(z)
        bound = (joint - log_q(z[perm])).mean()
        return MIEstimate(bound, log_q(z.detach()).mean())

    def update_ema(self, *_) -> None:
        pass


ESTIMATORS = {"mine": Mine, "mine_f": MineF, "club": Club}


def build_estimator(kind: str, dims: Sequence[int], hidden: int = 512, ema_rate: float = 0.01) -> nn.Module:
    if kind not in ESTIMATORS:
        raise ValueError(f"unknown MI estimator {kind!r}; known: {', '.join(ESTIMATOR_KINDS)}")
    return ESTIMATORS[kind](dims, hidden, ema_rate) if kind == "mine" else ESTIMATORS[kind](dims, hidden)


class ConditionalMI(nn.Module):
    """I(Z; X | C) = I(Z; [X, C]) − I(Z; C), each term its own estimator on the same
    derangement (docs/methods/cibr.md §2's A and C terms)."""

    def __init__(self, kind: str, z_dim: int, x_dim: int, c_dim: int, hidden: int = 512, ema_rate: float = 0.01):
        super().__init__()
        self.joint = build_estimator(kind, (z_dim, x_dim, c_dim), hidden, ema_rate)  # A
        self.condition = build_estimator(kind, (z_dim, c_dim), hidden, ema_rate)  # C

    def forward(self, z, x, c, perm) -> tuple[MIEstimate, MIEstimate]:
        return self.joint(z, (x, c), perm), self.condition(z, (c,), perm)

    @torch.no_grad()
    def update_ema(self, z, x, c, perm) -> None:
        self.joint.update_ema(z, (x, c), perm)
        self.condition.update_ema(z, (c,), perm)

    @staticmethod
    def combine(terms: tuple[MIEstimate, MIEstimate]) -> MIEstimate:
        joint, condition = terms
        return MIEstimate(joint.value - condition.value, joint.objective + condition.objective)
