"""CLIP-PGS patch selection (Pei et al.), pure tensor functions under no-grad: which patch
tokens of each image stay in the sequence and which of those are hidden from attention.

Two modes (docs/methods/pgs.md): `select_reference` reproduces the released code's semantics
(§3, with the deviations of §5), `select_paper` is the clean interpretation (§5).
Random draws come in as arguments, so each step is checkable against a naive reference.

Shapes: B images, L patches on a grid of g_h x g_w, D token width, P = 3 p^2 pixel values.
The selectors' output length is static (it never depends on device values, so selection
needs no host synchronisation): each image's data-dependent rest is hidden by a mask.
`remove_shared_hidden` then takes the hidden tokens that every image of the batch shares
out of the sequence (the batch minimum), at the price of one count read by the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.config import PGSConfig
from training.methods.flip import compute_num_keep
from training.methods.pgs.sinkhorn import normalize_similarity_paper, normalize_similarity_reference

PATCH_STD_EPS = 1e-6  # added to each pixel patch's std (released code)
REFERENCE_EDGE_WEIGHT = 1e6  # seed score u + 1e6 * e: edges decide, u breaks ties
SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def compute_num_seeds(num_patches: int, candidate_ratio: float) -> int:
    """L - int(L (1 - candidate_ratio)) initial candidates: 10 of 196 at 0.05 (at least one)."""
    return max(1, num_patches - int(num_patches * (1.0 - candidate_ratio)))


def compute_drop_bounds(num_patches: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """Per-image drop count range [ceil(lower L), floor(upper L)] of the paper mode (float
    noise such as 0.3 * 10 = 3.0000000000000004 rounded away first). A range holding no
    whole count (PGS0.5 with odd L: [24.5, 24.5]) falls back to FLIP's count at the upper
    ratio, L - floor(L (1 - upper))."""
    low = math.ceil(round(min_ratio * num_patches, 6))
    high = math.floor(round(max_ratio * num_patches, 6))
    if low > high:
        low = high = num_patches - compute_num_keep(num_patches, max_ratio)
    return low, high


@dataclass(frozen=True)
class Selection:
    """keep_index: (B, K) patch indices left in the sequence (K static); hidden: (B, K)
    True where a kept token is masked out of attention as a key (None: nothing hidden);
    num_dropped: (B,) float, patches the image does not see (removed + hidden)."""

    keep_index: torch.Tensor
    hidden: torch.Tensor | None
    num_dropped: torch.Tensor


def remove_shared_hidden(selection: Selection) -> Selection:
    """Removes from the sequence the number of hidden tokens every image has (the batch
    minimum of hidden counts), so the data-dependent drop costs no compute where the batch
    agrees: reference mode's batch-uniform keep count leaves nothing hidden, and paper
    mode's images drop min_b k_b physically. The visible token set of each image does not
    change. One host read per call (the two counts, in one transfer): shapes need them."""
    if selection.hidden is None:
        return selection
    counts = selection.hidden.sum(dim=1)
    fewest, most = torch.stack([counts.min(), counts.max()]).tolist()
    if most == 0:
        return Selection(selection.keep_index, None, selection.num_dropped)
    if fewest == 0:
        return selection
    order = selection.hidden.logical_not().to(torch.uint8).argsort(dim=1, stable=True)[:, fewest:]
    hidden = selection.hidden.gather(1, order) if most > fewest else None
    return Selection(selection.keep_index.gather(1, order), hidden, selection.num_dropped)


# ------------------------------------------------------------------ shared features


def extract_pixel_patches(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, L, p*p*3) in raster order, values ordered (row, column, channel)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image {h}x{w} is not a whole number of {p}-pixel patches")
    grid = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, p, p, C)
    return grid.reshape(b, (h // p) * (w // p), p * p * c)


def standardize_patches(patches: torch.Tensor) -> torch.Tensor:
    """Each patch vector minus its mean, over its (unbiased) std + 1e-6."""
    mean = patches.mean(dim=-1, keepdim=True)
    return (patches - mean) / (patches.std(dim=-1, keepdim=True) + PATCH_STD_EPS)


def compute_cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, L) cosine similarities."""
    unit = F.normalize(x, dim=-1)
    return unit @ unit.transpose(1, 2)


def compute_mixed_similarity(tokens: torch.Tensor, pixel_patches: torch.Tensor, alpha: float) -> torch.Tensor:
    """S = alpha S_x + (1 - alpha) S_I: token (feature) and pixel (image) cosines."""
    return alpha * compute_cosine_matrix(tokens) + (1.0 - alpha) * compute_cosine_matrix(pixel_patches)


def normalize_min_max(values: torch.Tensor) -> torch.Tensor:
    """Per row to [0, 1]; a constant row maps to zeros."""
    low = values.amin(dim=-1, keepdim=True)
    span = values.amax(dim=-1, keepdim=True) - low
    return (values - low) / span.clamp_min(torch.finfo(values.dtype).tiny)


def build_sobel_kernels() -> torch.Tensor:
    """(2, 1, 3, 3): d/dx and d/dy (a module buffer, so no host copy inside the step)."""
    kx = torch.tensor(SOBEL_X)
    return torch.stack([kx, kx.T]).unsqueeze(1)


def compute_sobel_magnitude_zero_padded(grey: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) -> (B, 1, h, w) 3x3 Sobel gradient magnitude, zero padding 1 (the released
    code's; the shards' edge maps reflect their borders, pipelines/edges.py)."""
    grad = F.conv2d(grey, kernels.to(grey.dtype), padding=1)
    return grad.pow(2).sum(dim=1, keepdim=True).sqrt()


# ------------------------------------------------------------------ reference mode


def compute_reference_edges(std_patches: torch.Tensor, grid: tuple[int, int], kernels: torch.Tensor) -> torch.Tensor:
    """The released edge map (§3 step 2, degenerate by design: the mean of a standardised
    patch is zero up to round-off, which min-max normalisation blows up). (B, L) in [0, 1]."""
    grey = std_patches.mean(dim=-1).reshape(-1, 1, *grid)  # (B, 1, gh, gw)
    return normalize_min_max(compute_sobel_magnitude_zero_padded(grey, kernels).flatten(1))


def select_reference(
    similarity: torch.Tensor,
    edges: torch.Tensor | None,
    config: PGSConfig,
    seed_noise: torch.Tensor,
    order_noise: torch.Tensor,
) -> Selection:
    """§3 steps 4-8 on S (B, L, L); edges (B, L) or None without ED; noises U(0,1) (B, L)."""
    num_patches = similarity.shape[-1]
    if config.use_ot:
        similarity = normalize_similarity_reference(similarity, config.sinkhorn_iters)
    seed_score = seed_noise if edges is None else seed_noise + REFERENCE_EDGE_WEIGHT * edges
    num_seeds = compute_num_seeds(num_patches, config.candidate_ratio)
    seeds = seed_score.topk(num_seeds, dim=1).indices  # the highest scores seed the mask
    masked = gather_rows(similarity, seeds).gt(config.similarity_threshold).any(dim=1)  # (B, L)
    # Step 7: one keep count for the batch (the edge sum added to a count is the released rule).
    most = compute_num_keep(num_patches, config.min_mask_ratio)
    min_p = num_patches - masked.sum(dim=1).min().float()
    if edges is not None:
        min_p = min_p + edges.sum(dim=1).min()
    num_keep = min_p.floor().clamp(1, most)  # () tensor, never read on the host
    # Step 8: un-masked tokens first (stable: raster order), then masked ones at random.
    order = (order_noise.exp() * masked).argsort(dim=1, stable=True)
    keep_index = order[:, :most]  # (B, most): the static maximum stays in the sequence
    hidden = torch.arange(most, device=order.device).expand_as(keep_index) >= num_keep
    return Selection(keep_index, hidden, (num_patches - num_keep).expand(len(order)))


def gather_rows(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """matrix (B, L, M), rows (B, n) -> (B, n, M)."""
    return matrix.gather(1, rows.unsqueeze(-1).expand(-1, -1, matrix.shape[-1]))


# ------------------------------------------------------------------ paper mode


def rank_with_random_ties(values: torch.Tensor, tie_noise: torch.Tensor) -> torch.Tensor:
    """Rank (0 = smallest) of each entry along dim 1, equal values ordered by the noise."""
    shuffled = tie_noise.argsort(dim=1)
    order = shuffled.gather(1, values.gather(1, shuffled).argsort(dim=1, stable=True))
    ranks = torch.empty_like(order)
    return ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))


def select_paper(
    similarity: torch.Tensor,
    edges: torch.Tensor | None,
    config: PGSConfig,
    tie_noise: torch.Tensor,
    seed_noise: torch.Tensor,
    order_noise: torch.Tensor,
) -> Selection:
    """§5: seeds among low-edge patches, candidates = patches similar to a seed minus the
    strongest edges, each image dropping clip(|C|, ceil(lower L), floor(upper L)) patches.
    edges: (B, L) per-patch Sobel scores (any scale) or None without ED."""
    batch = similarity.shape[0]
    num_patches = similarity.shape[-1]
    if config.use_ot:
        similarity = normalize_similarity_paper(similarity, config.sinkhorn_reg, config.sinkhorn_iters)
    num_seeds = compute_num_seeds(num_patches, config.candidate_ratio)
    eligible = torch.ones(batch, num_patches, dtype=torch.bool, device=similarity.device)
    protected = torch.zeros_like(eligible)
    if edges is not None:
        ranks = rank_with_random_ties(normalize_min_max(edges), tie_noise)
        eligible = ranks < max(num_patches // 2, num_seeds)  # below the median
        protected = ranks >= num_patches - math.ceil(config.edge_protect_fraction * num_patches)
    seeds = (seed_noise - 2.0 * (~eligible)).topk(num_seeds, dim=1).indices  # random eligible
    similar = gather_rows(similarity, seeds).gt(config.similarity_threshold).any(dim=1)  # (B, L)
    candidates = similar & ~protected
    low, high = compute_drop_bounds(num_patches, config.min_mask_ratio, config.max_mask_ratio)
    num_drop = candidates.sum(dim=1).clamp(low, high)  # (B,) per-image drop count
    # Drop order: candidates at random, then unprotected patches, protected ones last.
    priority = 2.0 * candidates + (~protected) + order_noise  # (B, L), groups never mix
    order = priority.argsort(dim=1, descending=True)
    keep_index = order[:, low:]  # the static minimum `low` leaves the sequence
    hidden = None
    if high > low:  # the rest of each image's drop is hidden from attention
        hidden = torch.arange(num_patches - low, device=order.device) < (num_drop - low)[:, None]
    return Selection(keep_index, hidden, num_drop.float())
