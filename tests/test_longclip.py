"""Long-CLIP: the batch's top-k principal-component projection against NumPy's eigen-
decomposition of the covariance, the two-term loss, and the two-caption batch path (one long
and one short caption of the image's own group per step), plus the single-caption "mix"."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines import shards
from tests.test_edges_transforms import ARCH, CROP_SCALE, IMAGE_SIZE, PATCH_SIZE, as_batch, shard_rows  # noqa: F401
from training.batches import SHORT_TEXTS, TEXTS, BatchPreprocessor, choose_caption
from training.methods.clip.loss import ContrastiveLoss
from training.methods.longclip.loss import LongClipLoss, project_to_principal_components


def reference_projection(x: np.ndarray, k: int) -> np.ndarray:
    """Centre, eigenvectors of the covariance with the k largest eigenvalues, project, add
    the mean back."""
    mean = x.mean(0, keepdims=True)
    values, vectors = np.linalg.eigh((x - mean).T @ (x - mean))
    top = vectors[:, np.argsort(values)[::-1][:k]]  # (d, k)
    return (x - mean) @ top @ top.T + mean


@pytest.mark.parametrize("batch, dim, k", [(16, 12, 4), (10, 32, 3), (40, 8, 8)])
def test_projection_matches_covariance_eigenvectors(batch, dim, k):
    x = np.random.default_rng(batch).normal(size=(batch, dim)) * np.linspace(3, 0.1, dim)  # distinct spectrum
    ours = project_to_principal_components(torch.from_numpy(x), k).numpy()
    np.testing.assert_allclose(ours, reference_projection(x, k), rtol=1e-9, atol=1e-9)


def test_all_components_keep_the_features():
    x = torch.randn(12, 6, dtype=torch.float64)
    torch.testing.assert_close(project_to_principal_components(x, 6), x)


def test_loss_terms_with_full_rank_projection_are_clip_losses():
    g = torch.Generator().manual_seed(0)
    image, long_text, short_text = (
        F.normalize(torch.randn(8, 6, generator=g, dtype=torch.float64), dim=-1) for _ in range(3)
    )
    scale = torch.tensor(20.0, dtype=torch.float64)
    terms = LongClipLoss(num_components=6)(
        {"image_features": image, "text_features": long_text, "short_text_features": short_text, "logit_scale": scale}
    )
    clip = ContrastiveLoss()
    expected_long = clip({"image_features": image, "text_features": long_text, "logit_scale": scale})
    expected_short = clip({"image_features": image, "text_features": short_text, "logit_scale": scale})
    torch.testing.assert_close(terms["long"], expected_long["contrastive"])
    torch.testing.assert_close(terms["short"], expected_short["contrastive"])
    fewer = LongClipLoss(num_components=2)(
        {"image_features": image, "text_features": long_text, "short_text_features": short_text, "logit_scale": scale}
    )
    assert not torch.isclose(fewer["short"], terms["short"])


def captions_of(row: dict, kind: str) -> set[str]:
    return {c["text"] for c in json.loads(row[shards.META])["captions"] if c["kind"] == kind}


def test_long_and_short_batches_pair_each_image_with_its_own_captions(shard_rows):  # noqa: F811
    prepare = BatchPreprocessor(
        ARCH, IMAGE_SIZE, PATCH_SIZE, CROP_SCALE, seed=1, caption_policy="long_and_short", context_length=96
    )
    out = prepare.prepare_rows(as_batch(shard_rows, epoch=0))
    assert out[TEXTS].shape == out[SHORT_TEXTS].shape == (len(shard_rows), 96)
    tokenizer = prepare.tokenizer
    for row, long_tokens, short_tokens in zip(shard_rows, out[TEXTS], out[SHORT_TEXTS]):
        long_captions = {tuple(tokenizer([c])[0].tolist()) for c in captions_of(row, shards.CAPTION_LONG)}
        short_captions = {tuple(tokenizer([c])[0].tolist()) for c in captions_of(row, shards.CAPTION_SHORT)}
        assert tuple(long_tokens.tolist()) in long_captions
        assert tuple(short_tokens.tolist()) in short_captions


def test_single_caption_batches_have_no_second_caption(shard_rows):  # noqa: F811
    prepare = BatchPreprocessor(ARCH, IMAGE_SIZE, PATCH_SIZE, CROP_SCALE, seed=1, caption_policy="mix")
    assert SHORT_TEXTS not in prepare.prepare_rows(as_batch(shard_rows, epoch=0))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 1.0])
def test_mix_draws_the_long_caption_with_its_fraction(fraction):
    captions = [
        {"kind": "short", "text": "s1"},
        {"kind": "short", "text": "s2"},
        {"kind": "short", "text": "s3"},
        {"kind": "long", "text": "l"},
    ]
    rng = np.random.default_rng(0)
    draws = [choose_caption(captions, "mix", rng, fraction) for _ in range(4000)]
    assert abs(draws.count("l") / len(draws) - fraction) < 0.03
    assert {d for d in draws if d != "l"} == ({"s1", "s2", "s3"} if fraction < 1 else set())


def test_unknown_caption_policy_is_refused_up_front():
    with pytest.raises(ValueError, match="unknown caption policy"):
        BatchPreprocessor(ARCH, IMAGE_SIZE, PATCH_SIZE, CROP_SCALE, seed=1, caption_policy="longest")
