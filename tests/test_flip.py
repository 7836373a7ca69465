"""FLIP's random patch dropping: how many tokens it keeps, that they are distinct input
patches behind an untouched class token, reproducibility from a seeded generator, and that
the model really feeds a shorter sequence in training and is plain CLIP in eval mode."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import MaskingConfig, ModelConfig, Temperature
from training.methods.flip import RandomPatchDrop, compute_num_keep
from training.model import build_model
from training.towers import build_tokenizer

ARCH = "clip-micro-p8-32"  # 32 px images, 8 px patches: a 4 x 4 grid, L = 16
NUM_PATCHES = 16


pytestmark = pytest.mark.usefixtures("single_torch_thread")  # see conftest


def make_tokens(batch: int, num_patches: int, dim: int = 4, seed: int = 0) -> torch.Tensor:
    """(B, 1 + L, D) tokens whose channel 0 names the token: -1 for the class token, i for
    patch i; the other channels are random."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1 + num_patches, dim, generator=g)
    x[:, 0, 0] = -1.0
    x[:, 1:, 0] = torch.arange(num_patches, dtype=x.dtype)
    return x


def drop_patches(x: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    drop = RandomPatchDrop(ratio).train()
    drop.generator = torch.Generator().manual_seed(seed)
    return drop(x)


@pytest.mark.parametrize(
    "num_patches, ratio, expected",
    [
        (16, 0.5, 8),
        (196, 0.5, 98),
        (16, 0.75, 4),
        (49, 0.0, 49),
        (10, 0.3, 7),
        (1, 0.9, 1),  # at least one patch survives
        (10, 0.95, 1),
        (5, 0.5, 2),
        (7, 0.5, 3),
        (196, 0.3, 137),
        (100, 0.9, 10),
    ],
)
def test_compute_num_keep_by_hand(num_patches, ratio, expected):
    assert compute_num_keep(num_patches, ratio) == expected


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    num_patches=st.integers(1, 40),
    ratio=st.floats(0.0, 0.95, allow_nan=False),
    seed=st.integers(0, 2**31),
)
def test_keeps_class_token_and_distinct_input_patches(batch, num_patches, ratio, seed):
    x = make_tokens(batch, num_patches, seed=seed)
    out = drop_patches(x, ratio, seed)
    num_keep = compute_num_keep(num_patches, ratio)
    assert 1 <= num_keep <= num_patches
    assert out.shape == (batch, 1 + num_keep, x.shape[-1])
    assert torch.equal(out[:, 0], x[:, 0])  # class token first, untouched
    for b in range(batch):
        kept = out[b, 1:, 0].long()  # (K,) patch indices, read from channel 0
        assert kept.min() >= 0 and kept.max() < num_patches
        assert len(set(kept.tolist())) == num_keep  # no duplicates
        assert torch.equal(out[b, 1:], x[b, 1 + kept])  # whole rows, as in the input


def test_identity_in_eval_mode_and_at_ratio_zero():
    x = make_tokens(2, NUM_PATCHES)
    assert RandomPatchDrop(0.5).eval()(x) is x
    assert RandomPatchDrop(0.0).train()(x) is x


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError):
        RandomPatchDrop(ratio)


def test_same_seed_same_mask_and_masks_differ_across_rows_and_seeds():
    x = make_tokens(4, NUM_PATCHES)
    first, again = drop_patches(x, 0.5, seed=7), drop_patches(x, 0.5, seed=7)
    assert torch.equal(first, again)
    other = drop_patches(x, 0.5, seed=8)
    assert not torch.equal(first, other)
    kept_sets = {tuple(sorted(first[b, 1:, 0].long().tolist())) for b in range(4)}
    assert len(kept_sets) > 1  # one draw per image, not one mask for the batch


# ---------------------------------------------------------------- inside the model


def build_micro(kind: str, ratio: float):
    return build_model(ModelConfig(ARCH), MaskingConfig(kind, ratio), Temperature())


def record_vision_sequence_lengths(model) -> list[int]:
    """Sequence lengths entering the vision transformer, appended on every forward."""
    lengths = []
    transformer = model.tower.visual.transformer
    token_dim = 1 if transformer.batch_first else 0

    def hook(module, args):
        lengths.append(args[0].shape[token_dim])

    transformer.register_forward_pre_hook(hook)
    return lengths


def test_model_sends_shorter_sequence_in_training():
    torch.manual_seed(0)
    model = build_micro("random", 0.5)
    assert isinstance(model.patch_selector, RandomPatchDrop)
    lengths = record_vision_sequence_lengths(model)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.train().tower.encode_image(images)
        model.eval().tower.encode_image(images)
    assert lengths == [1 + compute_num_keep(NUM_PATCHES, 0.5), 1 + NUM_PATCHES]
    assert lengths[0] == 9


def test_model_in_eval_mode_equals_unmasked_clip_with_same_weights():
    torch.manual_seed(0)
    flip = build_micro("random", 0.5)
    torch.manual_seed(1)
    clip = build_micro("none", 0.0)
    clip.load_state_dict(flip.state_dict())
    images = torch.randn(3, 3, 32, 32)
    texts = build_tokenizer(ARCH)(["a cat", "a dog", "two birds"])
    flip.eval(), clip.eval()
    with torch.no_grad():
        flip_out, clip_out = flip(images, texts), clip(images, texts)
        assert torch.equal(flip.tower.encode_image(images), clip.tower.encode_image(images))
        flip.train()
        flip.patch_selector.generator = torch.Generator().manual_seed(0)
        masked = flip.tower.encode_image(images)
    for key in ("image_features", "text_features", "logit_scale"):
        assert torch.equal(flip_out[key], clip_out[key]), key
    assert not torch.allclose(masked, clip.tower.encode_image(images))  # the mask did act


def test_seeded_model_forward_is_reproducible_in_training():
    torch.manual_seed(0)
    model = build_micro("random", 0.5).train()
    images = torch.randn(2, 3, 32, 32)
    features = []
    for _ in range(2):
        model.patch_selector.generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            features.append(model.tower.encode_image(images))
    assert torch.equal(*features)
