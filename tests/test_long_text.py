"""Long-CLIP positional stretching: the anchor rows of docs/methods/longclip.md §2 (77 -> 248), a
row-by-row reference for other (n, k, f), frozen first rows under AdamW, the causal mask and
tokenizer context of a stretched tower, and captions within the kept rows unchanged."""

from __future__ import annotations

import pytest
import torch

from training.config import MaskingConfig, ModelConfig, OptimConfig, Temperature
from training.methods.longclip.positions import (
    apply_long_text,
    compute_stretched_context,
    stretch_positional_table,
    zero_frozen_rows,
)
from training.model import build_model
from training.optim import build_optimizer
from training.towers import build_tokenizer

ARCH = "clip-micro-p8-32"

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def reference_stretch(table: torch.Tensor, keep: int, factor: int) -> torch.Tensor:
    """Row by row, as the recipe is written: copy rows < k; each later row i gives f rows
    interpolated towards row i+1; the last row extrapolates along (P[n-1] - P[n-2])."""
    n, rows = table.shape[0], [table[i] for i in range(keep)]
    for i in range(keep, n):
        for j in range(factor):
            if i < n - 1:
                rows.append((1 - j / factor) * table[i] + (j / factor) * table[i + 1])
            else:
                rows.append(table[i] + (j / factor) * (table[i] - table[i - 1]))
    return torch.stack(rows)


def test_long_clip_anchor_rows():
    old = torch.randn(77, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    new = stretch_positional_table(old, keep=20, factor=4)
    assert new.shape == (248, 16) and compute_stretched_context(77, 20, 4) == 248
    expected = {
        19: old[19],
        20: old[20],
        21: 0.75 * old[20] + 0.25 * old[21],
        243: 0.25 * old[75] + 0.75 * old[76],
        244: old[76],
        247: old[76] + 0.75 * (old[76] - old[75]),
    }
    for row, value in expected.items():
        torch.testing.assert_close(new[row], value, rtol=1e-12, atol=1e-12, msg=f"row {row}")
    torch.testing.assert_close(new[:20], old[:20], rtol=0, atol=0)


@pytest.mark.parametrize("n, keep, factor", [(77, 20, 4), (24, 8, 4), (16, 0, 3), (10, 9, 2), (12, 5, 1)])
def test_stretch_matches_row_by_row_reference(n, keep, factor):
    old = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    new = stretch_positional_table(old, keep, factor)
    assert new.shape[0] == compute_stretched_context(n, keep, factor) == keep + factor * (n - keep)
    torch.testing.assert_close(new, reference_stretch(old, keep, factor), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n, keep, factor", [(77, 77, 4), (77, -1, 4), (77, 20, 0), (1, 0, 4)])
def test_impossible_stretch_is_an_error(n, keep, factor):
    with pytest.raises(ValueError, match="cannot stretch"):
        compute_stretched_context(n, keep, factor)


def stretched_model(keep: int, factor: int):
    return build_model(
        ModelConfig(ARCH, text_positions_kept=keep, text_stretch_factor=factor), MaskingConfig(), Temperature()
    )


def test_stretched_tower_geometry_and_tokenizer():
    model = stretched_model(20, 4)
    tower = model.tower
    assert tower.positional_embedding.shape[0] == tower.context_length == 248
    assert tower.attn_mask.shape == (248, 248)
    assert torch.isinf(tower.attn_mask[0, 1]) and tower.attn_mask[1, 0] == 0 and tower.attn_mask[5, 5] == 0
    assert stretched_model(20, 1).tower.context_length == 77  # what the tokenizer reads (model.sample_geometry)
    tokens = build_tokenizer(ARCH, 248)(["word " * 200])
    assert tokens.shape == (1, 248)
    assert tower.encode_text(tokens).shape == (1, tower.text_projection.shape[1])


def test_captions_within_the_kept_rows_encode_as_before():
    """Causal attention and EOT pooling: a caption whose EOT sits before row k only sees rows
    < k, which stretching copies, so its feature does not change."""
    torch.manual_seed(0)
    base = stretched_model(20, 1)
    stretched = stretched_model(20, 4)
    stretched.tower.load_state_dict(
        {
            **base.tower.state_dict(),
            "positional_embedding": stretch_positional_table(base.tower.positional_embedding.data, 20, 4),
        }
    )
    short = ["a small red circle", "a blue square on the left"]
    before = base.tower.encode_text(build_tokenizer(ARCH, 77)(short))
    after = stretched.tower.encode_text(build_tokenizer(ARCH, 248)(short))
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_kept_rows_stay_frozen_under_adamw():
    torch.manual_seed(0)
    model = stretched_model(20, 4)
    table_before = model.tower.positional_embedding.detach().clone()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2))
    tokens = build_tokenizer(ARCH, 248)(["word " * 100, "a red circle"])
    for _ in range(3):
        optimizer.zero_grad()
        model.tower.encode_text(tokens).square().sum().backward()
        zero_frozen_rows(model)  # as the training step does
        optimizer.step()
    table_after = model.tower.positional_embedding.detach()
    assert torch.equal(table_after[:20], table_before[:20])
    assert not torch.equal(table_after[20:105], table_before[20:105])  # rows the long text reaches


def test_factor_one_leaves_the_tower_untouched():
    model = stretched_model(20, 1)
    parameter = model.tower.positional_embedding
    apply_long_text(model.tower, 20, 1)
    assert model.tower.positional_embedding is parameter and model.tower.context_length == 77
