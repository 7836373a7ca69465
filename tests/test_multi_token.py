"""Multi(n, m) towers (training/methods/topology/multi_token.py): m [CLS] tokens in the vision tower that FLIP
and PGS keep, and both text routes against a naive per-sample reference without masks."""

from __future__ import annotations

import pytest
import torch

from training.config import apply_overrides
from training.methods.recipes import build_method_config
from training.model import build_training_model
from training.towers import num_class_tokens
from training.towers import build_tower_model

ARCH = "clip-micro-p8-32"
M = 4


def multi_model(method: str = "clip", **overrides):
    torch.manual_seed(0)
    config = apply_overrides(
        build_method_config(method), {"model.arch": ARCH, "topology.kind": "multi", "topology.m": M, **overrides}
    )
    return build_training_model(config)


def texts_with_padding(tokenizer) -> torch.Tensor:
    return tokenizer(["a red circle", "two small blue squares on the left", "x"])


def record_transformer_input(visual):
    seen = []
    handle = visual.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(args[0]), with_kwargs=True
    )
    return seen, handle


def test_vision_tower_pools_m_class_tokens_through_one_projection():
    model = multi_model().eval()
    visual = model.tower.visual
    width, n = visual.class_embedding.shape[1], model.topology.n
    assert num_class_tokens(visual) == M and visual.class_embedding.shape == (M, width)
    assert visual.proj.shape == (width, n) and visual.positional_embedding.shape[0] == M + 16
    assert not torch.allclose(visual.class_embedding[0], visual.class_embedding[1])  # symmetry broken
    images = torch.randn(2, 3, 32, 32)
    features = model.tower.encode_image(images)
    assert features.shape == (2, M * n)
    # Naive: run the transformer, take the m first states, project each with the same matrix.
    x = visual.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(2, -1, -1), x], dim=1) + visual.positional_embedding
    states = visual.ln_post(visual.transformer(visual.ln_pre(x)))[:, :M]
    want = torch.cat([states[:, k] @ visual.proj for k in range(M)], dim=1)
    torch.testing.assert_close(features, want)
    embedded = model.embed_image(images).unflatten(1, (M, n))
    torch.testing.assert_close(embedded.norm(dim=-1), torch.ones(2, M))


@pytest.mark.parametrize("method", ["flip", "pgs0.5"])
def test_patch_selection_keeps_every_class_token(method):
    model = multi_model(method).train()
    visual = model.tower.visual
    seen, handle = record_transformer_input(visual)
    images = torch.randn(3, 3, 32, 32)
    try:
        outputs = model(images, texts=texts_with_padding(build_tokenizer_for(model)), edge_scores=None)
    finally:
        handle.remove()
    tokens = seen[0]  # (B, m + kept, w) after ln_pre
    assert tokens.shape[1] == M + 8  # 16 patches, half dropped, all m class tokens kept
    want = visual.ln_pre((visual.class_embedding + visual.positional_embedding[:M]).expand(3, -1, -1))
    torch.testing.assert_close(tokens[:, :M], want)
    assert outputs["image_features"].shape == (3, M * model.topology.n)


def build_tokenizer_for(model):
    from training.towers import build_tokenizer

    return build_tokenizer(ARCH)


def naive_text_slots(tower, text: torch.Tensor, route: str) -> torch.Tensor:
    """Per sample: only its non-pad tokens and the m slots, no padding mask at all."""
    outputs = []
    slots = tower.text_cls_embedding + tower.text_cls_positional_embedding  # (m, w)
    for row in text:
        length = int((row != 0).sum())
        x = tower.token_embedding(row[:length]) + tower.positional_embedding[:length]
        sequence = torch.cat([slots, x] if route == "prepend" else [x, slots])[None]
        mask = None
        if route == "append":
            size = sequence.shape[1]
            mask = torch.full((size, size), float("-inf")).triu_(1)
        states = tower.ln_final(tower.transformer(sequence, attn_mask=mask))[0]
        pooled = states[:M] if route == "prepend" else states[-M:]
        outputs.append((pooled @ tower.text_projection).flatten())
    return torch.stack(outputs)


@pytest.mark.parametrize("route", ["prepend", "append"])
def test_text_slots_see_every_text_token_and_no_pad(route):
    model = multi_model(**{"topology.text_tokens": route}).eval()
    tower = model.tower
    text = texts_with_padding(build_tokenizer_for(model))
    assert (text == 0).any()
    with torch.no_grad():
        got = tower.encode_text(text)
        want = naive_text_slots(tower, text, route)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_append_route_keeps_the_pretrained_text_states():
    """Appended slots under the causal mask: each text token's state is the plain tower's."""
    torch.manual_seed(3)
    plain = build_tower_model(ARCH).eval()
    model = multi_model(**{"topology.text_tokens": "append"}).eval()
    model.tower.load_state_dict(
        {k: v for k, v in plain.state_dict().items() if not k.startswith(("visual.", "text_projection"))}, strict=False
    )
    text = texts_with_padding(build_tokenizer_for(model))
    states = []
    handle = model.tower.ln_final.register_forward_hook(lambda module, args, out: states.append(out))
    plain_states = []
    plain_handle = plain.ln_final.register_forward_hook(lambda module, args, out: plain_states.append(out))
    with torch.no_grad():
        model.tower.encode_text(text)
        plain.encode_text(text)
    handle.remove(), plain_handle.remove()
    context = text.shape[1]
    for b, row in enumerate(text):
        length = int((row != 0).sum())
        torch.testing.assert_close(states[0][b, :length], plain_states[0][b, :length], rtol=1e-5, atol=1e-5)
    assert states[0].shape[1] == context + M


def test_auto_route_follows_the_start():
    assert multi_model().tower.text_cls_route == "prepend"


def test_multi_needs_a_class_token_vit():
    with pytest.raises(ValueError, match="multi"):
        from training.methods.topology.multi_token import convert_to_multi_token

        convert_to_multi_token(torch.nn.Linear(2, 2), M, 8, "prepend")


def test_the_saved_route_survives_rebuilding_without_pretrained(tmp_path):
    """A pretrained start appends its text slots; evaluation rebuilds the bare architecture
    (pretrained=None) from the saved config and must append too."""
    from training import checkpoint
    from training.inference import load_inference_model
    from training.methods.recipes import resolve_auto_fields
    from training.optim import build_optimizer, build_scheduler

    config = apply_overrides(
        build_method_config("multi"), {"model.arch": ARCH, "topology.m": M, "model.pretrained": "/weights/start.pt"}
    )
    config = resolve_auto_fields(config)
    assert config.topology.text_tokens == "append"
    local = apply_overrides(config, {"model.pretrained": None})  # no weights file here
    torch.manual_seed(0)
    model = build_training_model(local)
    optimizer = build_optimizer(model, config.optim)
    checkpoint.save_checkpoint(
        tmp_path / "step_00000001", model, optimizer, build_scheduler(optimizer, 1, 2), 1, config, {}
    )
    bundle = load_inference_model(str(tmp_path / "step_00000001"))
    assert bundle.model.model.tower.text_cls_route == "append"
    text = texts_with_padding(build_tokenizer_for(model))
    with torch.no_grad():
        torch.testing.assert_close(bundle.model.encode_text(text), model.eval().embed_text(text))
