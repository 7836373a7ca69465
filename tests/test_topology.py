"""Topologies (training/methods/topology/spaces.py) against the paper's definitions written naively: per-sphere
sums, per-pair arccos and norms, the template rule, numerics under bf16, and the config's
refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.test_contrastive_loss import load_clip_loss_class
from training.config import TopologyConfig, apply_overrides
from training.methods.clip.loss import ContrastiveLoss
from training.methods.recipes import build_method_config, check_combination
from training.methods.topology.spaces import (
    Euclidean,
    MultiToken,
    Oblique,
    ObliqueGeodesic,
    Sphere,
    build_topology,
    chunk_normalize,
)

SCALE = torch.tensor(7.5, dtype=torch.float64)


def raw(rows: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def naive_chunk_sum(u: torch.Tensor, v: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Σₖ ⟨u_k, v_k⟩ pair by pair, sphere by sphere."""
    out = torch.zeros(len(u), len(v), dtype=u.dtype)
    for a in range(len(u)):
        for b in range(len(v)):
            out[a, b] = sum(torch.dot(u[a, k * n : (k + 1) * n], v[b, k * n : (k + 1) * n]) for k in range(m))
    return out


@pytest.mark.parametrize("topology", [Oblique(4, 3), MultiToken(2, 6), Oblique(12, 1)])
def test_flattened_matmul_equals_explicit_per_sphere_sum(topology):
    u, v = topology.embed(raw(5, 12, 0)), topology.embed(raw(6, 12, 1))
    for k in range(topology.m):  # every chunk is a unit vector
        torch.testing.assert_close(
            u[:, k * topology.n : (k + 1) * topology.n].norm(dim=1), torch.ones(5, dtype=u.dtype)
        )
    torch.testing.assert_close(topology.logits(u, v, SCALE), SCALE * naive_chunk_sum(u, v, topology.n, topology.m))
    low, high = topology.similarity_range()
    assert (low, high) == (-topology.m, topology.m)


def loss_and_grads(topology, image, text, scale):
    image, text, scale = (t.detach().clone().requires_grad_(True) for t in (image, text, scale))
    loss = ContrastiveLoss(topology=topology)(
        {"image_features": topology.embed(image), "text_features": topology.embed(text), "logit_scale": scale}
    )
    loss = loss["contrastive"]
    return (loss, *torch.autograd.grad(loss, (image, text, scale)))


@pytest.mark.parametrize("topology", [Oblique(10, 1), MultiToken(10, 1)])
def test_one_sphere_equals_clip_loss_and_open_clip(topology):
    image, text = raw(6, 10, 2), raw(6, 10, 3)
    ours = loss_and_grads(topology, image, text, SCALE)
    clip = loss_and_grads(Sphere(10), image, text, SCALE)
    for a, b in zip(ours, clip):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    unit = torch.nn.functional.normalize
    theirs = load_clip_loss_class()()(unit(image, dim=-1), unit(text, dim=-1), SCALE)
    torch.testing.assert_close(ours[0], theirs, rtol=1e-12, atol=1e-12)


def naive_geodesic(u: torch.Tensor, v: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out = torch.zeros(len(u), len(v), dtype=u.dtype)
    for a in range(len(u)):
        for b in range(len(v)):
            angles = [
                math.acos(
                    max(
                        -1 + 1e-6, min(1 - 1e-6, float(torch.dot(u[a, k * n : (k + 1) * n], v[b, k * n : (k + 1) * n])))
                    )
                )
                for k in range(m)
            ]
            out[a, b] = -math.sqrt(sum(t * t for t in angles) + 1e-12)
    return out


@pytest.mark.parametrize("n, m", [(9, 1), (3, 3), (1, 9)])
def test_geodesic_equals_a_per_pair_loop(n, m):
    topology = ObliqueGeodesic(n, m)
    u, v = topology.embed(raw(4, 9, 4)), topology.embed(raw(5, 9, 5))
    got = topology.logits(u, v, SCALE)
    torch.testing.assert_close(got, SCALE * naive_geodesic(u, v, n, m).to(got.dtype))
    if m == 1:  # −s·arccos(uᵀv)
        torch.testing.assert_close(got, -SCALE * torch.arccos(u @ v.T), rtol=1e-6, atol=1e-6)
    assert got.max() <= 0 and got.min() >= -SCALE * math.pi * math.sqrt(m)


def test_euclidean_equals_the_norm_of_differences_without_normalising():
    topology = Euclidean(6)
    u, v = topology.embed(3 * raw(4, 6, 6)), topology.embed(raw(5, 6, 7))
    assert torch.equal(u, 3 * raw(4, 6, 6))  # not normalised
    naive = torch.stack([torch.stack([-(a - b).norm() for b in v]) for a in u])
    torch.testing.assert_close(topology.logits(u, v, SCALE), SCALE * naive, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("topology", [Sphere(8), Oblique(2, 4), MultiToken(4, 2), ObliqueGeodesic(2, 4), Euclidean(8)])
def test_template_averaged_scores_equal_averaged_distances(topology):
    """Zero-shot (docs/methods/topology.md §6): per class, the distance of the image to every template's
    prompt, averaged. Sphere keeps CLIP's rule instead (normalise, average, normalise)."""
    images = topology.embed(raw(7, 8, 8)).numpy()
    prompts = topology.embed(raw(3 * 5, 8, 9)).numpy().reshape(3, 5, 8)  # 3 classes x 5 templates
    got = topology.class_scores(images, prompts)
    if topology.kind == "sphere":
        mean = (prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)).mean(axis=1)
        want = images @ (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).T
    else:
        want = np.stack(
            [np.mean([topology.score(images, prompts[c, t][None])[:, 0] for t in range(5)], axis=0) for c in range(3)],
            axis=1,
        )
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_evaluation_scores_blocks_of_rows_like_one_matrix(monkeypatch):
    import training.methods.topology.spaces as topology_module

    topology = ObliqueGeodesic(4, 2)
    a, b = topology.embed(raw(9, 8, 10)).numpy(), topology.embed(raw(4, 8, 11)).numpy()
    whole = topology.score(a, b)
    monkeypatch.setattr(topology_module, "SCORE_BLOCK_ROWS", 2)
    np.testing.assert_array_equal(topology.score(a, b), whole)
    assert whole.dtype == np.float64


@pytest.mark.parametrize("topology", [ObliqueGeodesic(4, 2), Euclidean(8)])
def test_distance_logits_stay_float32_under_bf16_autocast(topology):
    """1 − 1e-6 rounds to 1 in bf16 and arccos' gradient becomes infinite: computed in float32."""
    base = topology.embed(torch.randn(4, 8))
    u = base.clone().requires_grad_(True)
    v = (base + 1e-4 * torch.randn(4, 8)).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = topology.logits(u.bfloat16(), v.bfloat16(), torch.tensor(10.0))
    assert logits.dtype == torch.float32
    logits.diagonal().sum().backward()
    assert torch.isfinite(u.grad).all()


def test_modality_gap_per_topology():
    image, text = np.array([[3.0, 4.0, 0.0, 2.0]]), np.array([[0.0, 1.0, 5.0, 0.0]])
    assert Sphere(4).modality_gap(image, text) == pytest.approx(
        np.linalg.norm(image[0] / np.linalg.norm(image) - text[0] / np.linalg.norm(text))
    )
    # Ob(2, 2): chunks (0.6, 0.8 | 0, 1) and (0, 1 | 1, 0); RMS over the two spheres.
    per_sphere = [np.linalg.norm([0.6, -0.2]), np.linalg.norm([-1.0, 1.0])]
    assert Oblique(2, 2).modality_gap(image, text) == pytest.approx(np.sqrt(np.mean(np.square(per_sphere))))
    assert Euclidean(4).modality_gap(image, text) == pytest.approx(np.linalg.norm(image - text))


def config_with(method: str, **overrides):
    return apply_overrides(build_method_config(method), overrides)


def test_undefined_combinations_are_refused_naming_both_parts():
    with pytest.raises(ValueError, match="smartclip.*oblique_geodesic"):
        check_combination(config_with("smartclip", **{"topology.kind": "oblique_geodesic", "topology.m": 4}))
    with pytest.raises(ValueError, match="euclidean.*m"):
        check_combination(config_with("euclidean", **{"topology.m": 4}))
    with pytest.raises(ValueError, match="unknown topology.kind"):
        check_combination(config_with("clip", **{"topology.kind": "torus"}))
    with pytest.raises(ValueError, match=r"oblique\(16, 4\).*128"):
        build_topology(TopologyConfig("oblique", 16, 4), 128)
    with pytest.raises(ValueError, match="does not split"):
        build_topology(TopologyConfig("oblique", 0, 3), 128)
    check_combination(config_with("flip", **{"topology.kind": "multi", "topology.m": 8}))  # defined
    assert build_topology(TopologyConfig("multi", 32, 16), 128).dim == 512  # Multi: any n


def test_named_methods_resolve_to_the_papers_rows():
    multi = config_with("multi")
    assert (multi.topology.kind, multi.topology.m) == ("multi", 8)
    assert build_topology(multi.topology, 128).n == 16 and build_topology(multi.topology, 512).n == 64
    assert config_with("multi-s3.95").loss.max_logit_scale == 3.95
    assert config_with("oblique-geodesic").topology.kind == "oblique_geodesic"
    assert config_with("euclidean").topology.kind == "euclidean"


def test_chunk_normalize_is_per_contiguous_chunk():
    x = torch.tensor([[3.0, 4.0, 0.0, 2.0]])
    torch.testing.assert_close(chunk_normalize(x, 2), torch.tensor([[0.6, 0.8, 0.0, 1.0]]))


def test_a_fixed_temperature_stays_out_of_the_optimiser():
    from training.model import build_training_model
    from training.optim import build_optimizer

    config = config_with(
        "clip", **{"model.arch": "clip-micro-p8-32", "loss.init_logit_scale": 0.0, "loss.learn_temperature": False}
    )
    model = build_training_model(config)
    assert model.tower.logit_scale.item() == 0.0 and not model.tower.logit_scale.requires_grad
    optimised = {id(p) for group in build_optimizer(model, config.optim).param_groups for p in group["params"]}
    assert id(model.tower.logit_scale) not in optimised


def test_multi_caps_the_logit_scale_at_100_over_m_unless_set():
    from training.config import resolve_max_logit_scale

    multi = config_with("multi")
    assert resolve_max_logit_scale(multi.loss, multi.topology) == 100 / 8
    assert resolve_max_logit_scale(config_with("oblique").loss, config_with("oblique").topology) == 100
    capped = config_with("multi", **{"loss.max_logit_scale": 100.0})
    assert resolve_max_logit_scale(capped.loss, capped.topology) == 100


def test_report_names_the_topology_and_its_range():
    from evaluation.report import format_info

    assert format_info(MultiToken(16, 8).describe()) == "multi(16, 8), similarity in [-8, 8]"
    assert format_info(Euclidean(128).describe()) == "euclidean(128, 1), similarity in [-inf, 0]"
    assert format_info("sphere") == "sphere"
