"""CLIP-PGS selection: both modes against naive per-image NumPy references written from
docs/methods/pgs.md §3 / §5 (the paper mode's OTN through POT's single-problem `ot.sinkhorn`),
the paper mode's mask-ratio bounds as a property, and edges protecting patches on real
photographs and demo scenes prepared as the training pipeline prepares them."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import PGSConfig
from training.methods.flip import random_masking
from training.methods.pgs import PGSSelector, Selection
from pipelines.demo_corpus import render_demo_samples
from training.methods.pgs.examples import SKIMAGE_SAMPLES, load_skimage_sample, prepare_batch
from training.methods.pgs.selection import (
    build_sobel_kernels,
    compute_drop_bounds,
    compute_mixed_similarity,
    compute_reference_edges,
    extract_pixel_patches,
    remove_shared_hidden,
    select_paper,
    select_reference,
    standardize_patches,
)
from training.transforms import normalize_image_tensor

from tests.test_pgs_sinkhorn import released_balancing_loop

pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


# ------------------------------------------------------------------ naive references


def naive_patches(image: np.ndarray, p: int) -> np.ndarray:
    """(3, H, W) -> (L, p*p*3), raster order, values (row, column, channel), standardised."""
    rows = []
    for r in range(image.shape[1] // p):
        for c in range(image.shape[2] // p):
            v = image[:, r * p : (r + 1) * p, c * p : (c + 1) * p].transpose(1, 2, 0).reshape(-1)
            rows.append((v - v.mean()) / (v.std(ddof=1) + 1e-6))
    return np.array(rows)


def naive_cosines(x: np.ndarray) -> np.ndarray:
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    return unit @ unit.T


def naive_sobel_minmax(grey: np.ndarray) -> np.ndarray:
    """3x3 Sobel magnitude with zero padding, min-max normalised, flattened."""
    padded = np.pad(grey, 1)
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    gx, gy = np.zeros_like(grey), np.zeros_like(grey)
    for i in range(grey.shape[0]):
        for j in range(grey.shape[1]):
            window = padded[i : i + 3, j : j + 3]
            gx[i, j], gy[i, j] = (window * kx).sum(), (window * kx.T).sum()
    mag = np.sqrt(gx**2 + gy**2).reshape(-1)
    return (mag - mag.min()) / max(mag.max() - mag.min(), np.finfo(np.float32).tiny)


def naive_reference(sims, edges, config: PGSConfig, seed_noise, order_noise):
    """§3 steps 5-8 on the (normalised) similarities: the visible patch indices of every
    image, in their kept order."""
    batch, L = sims.shape[:2]
    n_seeds = L - int(L * (1 - config.candidate_ratio))
    masked = []
    for b in range(batch):
        score = seed_noise[b] + (1e6 * edges[b] if config.use_edges else 0)
        seeds = np.argsort(score, kind="stable")[-n_seeds:]
        masked.append((sims[b][seeds] > config.similarity_threshold).any(axis=0))
    min_p = L - min(m.sum() for m in masked) + (min(e.sum() for e in edges) if config.use_edges else 0)
    n_keep = int(max(1, min(int(L * (1 - config.min_mask_ratio)), math.floor(min_p))))
    return [np.argsort(np.exp(order_noise[b]) * masked[b], kind="stable")[:n_keep] for b in range(batch)]


def naive_paper(sims, edge_scores, config: PGSConfig, tie_noise, seed_noise, order_noise):
    """§5 per image: the set of dropped patches (removed or hidden)."""
    L = sims.shape[1]
    low, high = compute_drop_bounds(L, config.min_mask_ratio, config.max_mask_ratio)  # by-hand test below
    n_seeds = L - int(L * (1 - config.candidate_ratio))
    dropped = []
    for b in range(len(sims)):
        s = sims[b]
        if config.use_ot:
            s = s + L * ot.sinkhorn(
                np.ones(L) / L,
                np.ones(L) / L,
                -s,
                config.sinkhorn_reg,
                numItermax=config.sinkhorn_iters,
                stopThr=0.0,
                warn=False,
            )
        eligible, protected = np.ones(L, bool), np.zeros(L, bool)
        if config.use_edges:
            e = edge_scores[b]
            e = (e - e.min()) / max(e.max() - e.min(), np.finfo(np.float32).tiny)
            ranks = np.empty(L, int)
            ranks[np.lexsort((tie_noise[b], e))] = np.arange(L)  # by edge, ties by noise
            eligible = ranks < max(L // 2, n_seeds)
            protected = ranks >= L - math.ceil(config.edge_protect_fraction * L)
        seeds = np.argsort(np.where(eligible, seed_noise[b], seed_noise[b] - 2))[-n_seeds:]
        candidates = (s[seeds] > config.similarity_threshold).any(axis=0) & ~protected
        k = int(np.clip(candidates.sum(), low, high))
        priority = 2.0 * candidates + (~protected) + order_noise[b]
        dropped.append(set(np.argsort(-priority, kind="stable")[:k].tolist()))
    return dropped


def visible_patches(selection, b: int) -> list[int]:
    keep = selection.keep_index[b]
    if selection.hidden is not None:
        keep = keep[~selection.hidden[b]]
    return keep.tolist()


def smooth_images(batch: int, size: int, seed: int) -> torch.Tensor:
    """CLIP-normalised images with large flat regions (many similar patches), so the
    reference keep count really depends on the batch."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 3, 3, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    images = images + 0.05 * torch.rand(batch, 3, size, size, generator=g)
    return normalize_image_tensor((images.clamp(0, 1) * 255).to(torch.uint8))


# ------------------------------------------------------------------ reference mode


@pytest.mark.parametrize(
    "use_edges, use_ot, alpha, min_ratio",
    [(True, True, 0.0, 0.5), (True, False, 0.25, 0.3), (False, True, 0.5, 0.3), (False, False, 0.9, 0.5)],
)
def test_reference_mode_equals_the_naive_released_algorithm(use_edges, use_ot, alpha, min_ratio):
    config = PGSConfig(
        mode="reference", min_mask_ratio=min_ratio, use_edges=use_edges, use_ot=use_ot, candidate_ratio=0.2
    )
    batch, size, p = 5, 32, 4  # L = 64
    images = smooth_images(batch, size, seed=1).double()
    g = torch.Generator().manual_seed(2)
    tokens = torch.randn(batch, 64, 12, generator=g, dtype=torch.float64)
    seed_noise, order_noise = torch.rand(2, batch, 64, generator=g, dtype=torch.float64)
    std = standardize_patches(extract_pixel_patches(images, p))
    edges = compute_reference_edges(std, (8, 8), build_sobel_kernels()) if use_edges else None  # checked below
    similarity = compute_mixed_similarity(tokens, std, alpha)
    naive_sims = np.stack(
        [
            alpha * naive_cosines(t) + (1 - alpha) * naive_cosines(naive_patches(im, p))
            for t, im in zip(tokens.numpy(), images.numpy())
        ]
    )
    np.testing.assert_allclose(similarity.numpy(), naive_sims, rtol=0, atol=1e-12)
    if use_ot:  # the released loop amplifies round-off (below): run it literally on the same S
        naive_sims = (similarity + released_balancing_loop(similarity, config.sinkhorn_iters)).numpy()
    selection = select_reference(similarity, edges, config, seed_noise, order_noise)
    expected = naive_reference(
        naive_sims, None if edges is None else edges.numpy(), config, seed_noise.numpy(), order_noise.numpy()
    )
    for b in range(batch):
        assert visible_patches(selection, b) == expected[b].tolist()
    assert selection.keep_index.shape == (batch, int(64 * (1 - min_ratio)))
    assert torch.equal(selection.num_dropped, torch.full((batch,), 64.0 - len(expected[0]), dtype=torch.float64))


def test_released_normalisation_amplifies_round_off():
    # Sinkhorn on raw cosines (row/column sums near zero): a 1e-15 change of S moves S' by
    # orders of magnitude more, so no two implementations agree on S' (docs/methods/pgs.md §4.3).
    images = smooth_images(5, 32, seed=1).double()
    similarity = compute_mixed_similarity(
        images.new_zeros(5, 64, 1) + 1, standardize_patches(extract_pixel_patches(images, 4)), 0.0
    )
    nudged = similarity * (1 + 1e-15)
    gap = (released_balancing_loop(similarity) - released_balancing_loop(nudged)).abs().max()
    assert gap > 1e-3


def test_reference_keep_count_follows_the_batch_and_is_hidden_not_resized():
    # Nearly flat images: many sim-masked tokens in every image pull min_p below the cap.
    config = PGSConfig(mode="reference", min_mask_ratio=0.3, use_edges=False)
    selector = PGSSelector(config, patch_size=4).train()
    selector.generator = torch.Generator().manual_seed(0)
    images = smooth_images(4, 32, seed=3)
    selection = selector(torch.randn(4, 64, 8), images, None, 0.0)
    cap = int(64 * 0.7)
    assert selection.keep_index.shape == (4, cap)  # static length
    num_keep = 64 - selection.num_dropped[0]
    assert num_keep < cap and torch.equal(selection.hidden.sum(dim=1), (cap - num_keep).long().expand(4))
    compact = remove_shared_hidden(selection)  # batch-uniform: everything hidden leaves
    assert compact.hidden is None and compact.keep_index.shape == (4, int(num_keep))
    assert [visible_patches(compact, b) for b in range(4)] == [visible_patches(selection, b) for b in range(4)]


def test_reference_edge_map_is_min_max_sobel_of_round_off_noise():
    # The released edge map reads the mean of standardised patches (zero up to round-off).
    images = smooth_images(2, 32, seed=4).double()
    std = standardize_patches(extract_pixel_patches(images, 4))
    assert std.mean(dim=-1).abs().max() < 1e-12
    edges = compute_reference_edges(std, (8, 8), build_sobel_kernels())
    grey = std.mean(dim=-1).reshape(2, 8, 8).numpy()
    for b in range(2):
        np.testing.assert_allclose(edges[b].numpy(), naive_sobel_minmax(grey[b]), rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------ paper mode


@pytest.mark.parametrize(
    "use_edges, use_ot, min_ratio", [(True, True, 0.3), (True, False, 0.5), (False, True, 0.3), (False, False, 0.1)]
)
def test_paper_mode_equals_the_naive_per_image_algorithm(use_edges, use_ot, min_ratio):
    config = PGSConfig(mode="paper", min_mask_ratio=min_ratio, use_edges=use_edges, use_ot=use_ot)
    batch, L = 6, 49
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(batch, L, 3, generator=g, dtype=torch.float64)  # low dim: many similar pairs
    sims = compute_mixed_similarity(feats, feats, 0.0)
    edge_scores = torch.randint(0, 6, (batch, L), generator=g).double() * 10  # many ties
    tie, seed, order = torch.rand(3, batch, L, generator=g, dtype=torch.float64)
    selection = select_paper(sims, edge_scores if use_edges else None, config, tie, seed, order)
    expected = naive_paper(sims.numpy(), edge_scores.numpy(), config, tie.numpy(), seed.numpy(), order.numpy())
    for b in range(batch):
        assert set(range(L)) - set(visible_patches(selection, b)) == expected[b]
        assert selection.num_dropped[b] == len(expected[b])


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 4),
    grid=st.integers(2, 7),
    low=st.floats(0.0, 0.6),
    span=st.floats(0.0, 0.3),
    use_edges=st.booleans(),
    use_ot=st.booleans(),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_paper_mode_drops_within_the_bounds_and_keeps_the_strongest_edges(
    batch, grid, low, span, use_edges, use_ot, alpha, seed
):
    L, p = grid * grid, 4
    config = PGSConfig(
        mode="paper", min_mask_ratio=low, max_mask_ratio=min(low + span, 0.8), use_edges=use_edges, use_ot=use_ot
    )
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, grid * p, grid * p, generator=g)
    edges = torch.rand(batch, L, generator=g) * 100
    selector = PGSSelector(config, patch_size=p).train()
    selector.generator = g
    selection = selector(torch.randn(batch, L, 8, generator=g), images, edges, alpha)
    lowest, highest = compute_drop_bounds(L, config.min_mask_ratio, config.max_mask_ratio)
    if math.ceil(round(low * L, 6)) <= math.floor(round(config.max_mask_ratio * L, 6)):
        assert (lowest, highest) == (math.ceil(round(low * L, 6)), math.floor(round(config.max_mask_ratio * L, 6)))
    assert selection.keep_index.shape == (batch, L - lowest)  # the static minimum is removed
    assert not selection.keep_index.requires_grad
    for b in range(batch):
        kept = selection.keep_index[b].tolist()
        assert len(set(kept)) == len(kept) and all(0 <= i < L for i in kept)
        visible = visible_patches(selection, b)
        dropped = L - len(visible)
        assert lowest <= dropped <= highest and dropped == selection.num_dropped[b]
        if selection.hidden is not None:
            assert selection.hidden[b].sum() == dropped - lowest
        if use_edges:  # the top 20 % of edge scores are never dropped
            strongest = edges[b].argsort(descending=True)[: math.ceil(0.2 * L)].tolist()
            assert set(strongest) <= set(visible)
    compact = remove_shared_hidden(selection)  # the batch minimum leaves the sequence
    assert compact.keep_index.shape == (batch, L - int(selection.num_dropped.min()))
    assert [visible_patches(compact, b) for b in range(batch)] == [visible_patches(selection, b) for b in range(batch)]


@settings(max_examples=60, deadline=None)
@given(batch=st.integers(1, 5), kept=st.integers(1, 12), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31))
def test_removing_the_shared_hidden_count_keeps_every_visible_set(batch, kept, density, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.stack([torch.randperm(20, generator=g)[:kept] for _ in range(batch)])
    hidden = torch.rand(batch, kept, generator=g) < density
    selection = Selection(keep, hidden, 20.0 - kept + hidden.sum(1).float())
    compact = remove_shared_hidden(selection)
    counts = hidden.sum(dim=1)
    assert compact.keep_index.shape == (batch, kept - int(counts.min()))
    assert compact.num_dropped is selection.num_dropped
    for b in range(batch):  # same visible tokens, in the same order
        assert visible_patches(compact, b) == visible_patches(selection, b)
    if compact.hidden is None:  # nothing left to hide only when every image hid as many
        assert (counts == counts[0]).all()
    else:
        assert compact.hidden.sum(dim=1).min() == 0


@pytest.mark.parametrize(
    "num_patches, low, high, expected",
    [
        (196, 0.3, 0.5, (59, 98)),
        (196, 0.5, 0.5, (98, 98)),
        (64, 0.3, 0.5, (20, 32)),
        (10, 0.3, 0.5, (3, 5)),
        (49, 0.5, 0.5, (25, 25)),  # no whole count in [24.5, 24.5]: FLIP keeps floor(24.5) = 24
        (10, 0.45, 0.49, (5, 5)),
        (16, 0.0, 0.0, (0, 0)),
    ],
)
def test_drop_bounds_by_hand(num_patches, low, high, expected):
    assert compute_drop_bounds(num_patches, low, high) == expected


def test_paper_mode_needs_edge_scores():
    selector = PGSSelector(PGSConfig(mode="paper"), patch_size=4).train()
    with pytest.raises(ValueError, match="edge_scores"):
        selector(torch.randn(1, 4, 8), torch.randn(1, 3, 8, 8), None, 0.0)


@pytest.mark.parametrize(
    "bad",
    [
        dict(mode="released"),
        dict(min_mask_ratio=0.6),
        dict(max_mask_ratio=1.0),
        dict(candidate_ratio=0.0),
        dict(sinkhorn_iters=0),
        dict(sinkhorn_reg=0.0),
    ],
)
def test_selector_rejects_bad_config(bad):
    with pytest.raises(ValueError):
        PGSSelector(PGSConfig(**bad), patch_size=4)


# ------------------------------------------------------------------ edges protect patches


def edge_means(edge_scores: torch.Tensor, visible: list[list[int]]) -> tuple[float, float]:
    """Mean edge score of visible and of dropped patches, averaged over images."""
    kept, dropped = [], []
    for b, vis in enumerate(visible):
        mask = torch.zeros(edge_scores.shape[1], dtype=torch.bool)
        mask[vis] = True
        kept.append(edge_scores[b][mask].mean())
        dropped.append(edge_scores[b][~mask].mean())
    return float(torch.stack(kept).mean()), float(torch.stack(dropped).mean())


@pytest.mark.parametrize("source", ["skimage", "demo"])
@pytest.mark.parametrize("min_ratio", [0.5, 0.3])
def test_paper_mode_keeps_edge_patches_more_than_it_drops_them_and_more_than_flip(source, min_ratio):
    rgbs = (
        [load_skimage_sample(n) for n in SKIMAGE_SAMPLES]
        if source == "skimage"
        else render_demo_samples(12, size=128, seed=1)
    )
    images_u8, edge_np = prepare_batch(rgbs, image_size=224, patch_size=16)  # L = 196
    images, edge_scores = normalize_image_tensor(torch.from_numpy(images_u8)), torch.from_numpy(edge_np)
    selector = PGSSelector(PGSConfig(mode="paper", min_mask_ratio=min_ratio), patch_size=16).train()
    selector.generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(len(images), 196, 32)  # alpha = 0: pixel similarity only (epoch 0)
    selection = selector(tokens, images, edge_scores, 0.0)
    pgs_kept, pgs_dropped = edge_means(edge_scores, [visible_patches(selection, b) for b in range(len(images))])
    flip_kept = []
    for seed in range(5):  # FLIP at the same number of kept patches per image
        ids = torch.arange(196, dtype=torch.float32).view(1, 196, 1).expand(len(images), -1, -1)
        x = torch.cat([torch.full((len(images), 1, 1), -1.0), ids], dim=1)
        kept = random_masking(x, 196 - int(selection.num_dropped.min()), torch.Generator().manual_seed(seed))
        flip_kept.append(edge_means(edge_scores, [kept[b, 1:, 0].long().tolist() for b in range(len(images))])[0])
    assert pgs_kept > pgs_dropped
    assert pgs_kept > max(flip_kept)
