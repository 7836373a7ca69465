"""OTI and OVI (evaluation/inversion.py) on a micro tower: the pseudo-inputs enter where the
paper puts them, the optimisation lowers the loss without touching the towers, and the features
do not depend on how queries are batched."""

from __future__ import annotations

import pytest
import torch

from evaluation.inversion import (
    InversionConfig,
    PseudoPatchImage,
    PseudoTokenText,
    check_inversion,
    initial_pseudo_inputs,
    invert,
    nearest_repeat,
    ovi_features,
    oti_features,
)
from training.towers import build_tokenizer, build_tower_model

ARCH = "clip-micro-p8-32"


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return build_tower_model(ARCH).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ARCH)


def test_placeholder_rows_are_replaced_before_positions_are_added(tower, tokenizer):
    """With the placeholder's own embedding as the pseudo-token, the prompt's plain encoding
    comes back; replacing after the positions were added would drop that slot's position."""
    text = PseudoTokenText(tower, tokenizer, InversionConfig(k=2))
    own = tower.token_embedding.weight[tokenizer(["£"])[0, 1]]
    with torch.no_grad():
        got = text(own.expand(3, 2, -1))
        want = tower.encode_text(tokenizer(["a photo of £ £"]))
        wrong = tower.token_embedding(text.tokens) + tower.positional_embedding
        wrong[:, text.positions] = own  # positions first, then replaced
        wrong = tower.ln_final(tower.transformer(wrong, attn_mask=tower.attn_mask))[:, text.eot] @ tower.text_projection
    torch.testing.assert_close(got, want.expand(3, -1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(wrong, want, atol=1e-4)


def test_nearest_repetition_fills_raster_runs():
    pseudo = torch.arange(4.0).view(1, 4, 1).expand(2, 4, 3)
    slots = nearest_repeat(pseudo, 256)
    assert slots.shape == (2, 256, 3)
    for j in range(4):
        assert (slots[:, 64 * j : 64 * (j + 1)] == j).all()
    assert (nearest_repeat(pseudo[:, :1], 49) == 0).all()


def test_pseudo_patches_are_conv1_outputs(tower):
    """k = L pseudo-patches equal to an image's patch embeddings give that image's feature."""
    image = torch.randn(1, 3, 32, 32)
    visual = tower.visual
    patches = visual.conv1(image).flatten(2).transpose(1, 2)  # (1, L, w)
    with torch.no_grad():
        torch.testing.assert_close(PseudoPatchImage(visual)(patches), tower.encode_image(image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["oti", "ovi"])
def test_loss_falls_and_the_towers_stay_bit_identical(tower, tokenizer, kind):
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    config = InversionConfig(kind=kind, k=1, steps=25)
    targets = torch.nn.functional.normalize(torch.randn(4, 64), dim=-1)
    if kind == "oti":
        forward = PseudoTokenText(tower, tokenizer, config)
    else:
        forward = PseudoPatchImage(tower.visual)
    init = initial_pseudo_inputs([f"q{i}" for i in range(4)], 1, forward.width, 0)
    tower.requires_grad_(False)
    try:
        _, losses = invert(forward, targets, init, config)
    finally:
        tower.requires_grad_(True)
    assert losses[-1] < 0.8 * losses[0]
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert all(p.requires_grad for p in tower.parameters())


def test_features_do_not_depend_on_the_batching(tower, tokenizer):
    config = InversionConfig(kind="oti", k=1, steps=10)
    targets = torch.nn.functional.normalize(torch.randn(6, 64, generator=torch.Generator().manual_seed(1)), dim=-1)
    ids = [f"image-{i}" for i in range(6)]
    whole = oti_features(tower, tokenizer, targets, ids, config)
    split = torch.cat(
        [
            oti_features(tower, tokenizer, targets[:2], ids[:2], config),
            oti_features(tower, tokenizer, targets[2:], ids[2:], config),
        ]
    )
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)
    reordered = ovi_features(tower, targets[[1, 0]], [ids[1], ids[0]], InversionConfig(kind="ovi", steps=5))
    straight = ovi_features(tower, targets[:2], ids[:2], InversionConfig(kind="ovi", steps=5))
    torch.testing.assert_close(reordered[[1, 0]], straight, rtol=1e-5, atol=1e-5)


def test_inversion_is_refused_off_the_sphere_and_for_bad_settings():
    with pytest.raises(ValueError, match="sphere.*multi"):
        check_inversion(InversionConfig(), "multi")
    with pytest.raises(ValueError, match="k >= 1"):
        check_inversion(InversionConfig(k=0), "sphere")
    with pytest.raises(ValueError, match="ViT"):
        check_inversion(InversionConfig(kind="ovi"), "sphere", torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="ViT image tower.*ModifiedResNet"):  # it has a conv1 too
        check_inversion(InversionConfig(kind="ovi"), "sphere", build_tower_model("clip-rn-micro-32").visual)
    check_inversion(InversionConfig(kind="oti"), "sphere", build_tower_model("clip-rn-micro-32").visual)
    assert InversionConfig(kind="oti").num_steps == 150 and InversionConfig(kind="ovi").num_steps == 1000


def test_encoders_invert_and_the_cache_returns_inverted_features_without_reoptimising(tmp_path, monkeypatch):
    import argparse

    import numpy as np

    from evaluation import encoders, evaluate
    from evaluation.task_registry import Benchmark, requests
    from evaluation.cache import EmbeddingCache
    from scoring.sets.classification import ClassificationSet
    from tests.eval_fixtures import class_image, save_micro_checkpoint

    uri = str(save_micro_checkpoint(tmp_path / "step_00000001"))
    images = [class_image(label, 0) for label in range(3)]
    data = ClassificationSet("c", images, np.arange(3), ["a", "b", "c"], [])
    bench = Benchmark(
        "c", "image_retrieval", {"train": data, "test": data}, {"query": "oti", "inversion": {"steps": 4}}
    )
    calls = []

    def encode_without_ray(modality, blocks, cache, args):  # the actors' code, called directly
        calls.append(modality)
        encoder, constructor, is_image, _ = evaluate.encoder_spec(modality, args)
        actor = encoders.BlockEncoder(
            encoder, constructor, is_image, modality, args.batch_size, cache.root, cache.fingerprint
        )
        rows = encoders.block_rows(blocks, is_image)
        return list(actor({key: [r[key] for r in rows] for key in rows[0]})[encoders.EMBEDDING])

    monkeypatch.setattr(evaluate, "encode", encode_without_ray)
    args = argparse.Namespace(
        checkpoint=uri,
        pinned_checkpoint=uri,
        checkpoint_cache=None,
        use_gpu=False,
        scorer="plain",
        batch_size=8,
        num_encoders=1,
        cache_block=1024,
    )
    first = evaluate.embed([bench], EmbeddingCache(str(tmp_path / "cache"), "fp"), args)[0]
    assert sorted(calls) == sorted(["image", requests(bench)["test"][0]])
    # The OTI features are the inversion of each image's own feature.
    bundle = encoders.ImageEncoder(uri).bundle
    with torch.no_grad():
        targets = bundle.model.encode_image(torch.stack([bundle.preprocess(b) for b in images]))
    ids = [encoders.image_identity("", b) for b in images]
    want = oti_features(bundle.model.model.tower, bundle.tokenizer, targets, ids, InversionConfig(steps=4))
    np.testing.assert_allclose(first["test"], want.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(first["test"], first["train"], atol=1e-2)  # text-side features, not the image's
    calls.clear()
    again = evaluate.embed([bench], EmbeddingCache(str(tmp_path / "cache"), "fp"), args)[0]
    assert calls == [] and np.array_equal(again["test"], first["test"])
