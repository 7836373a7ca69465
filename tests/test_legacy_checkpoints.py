"""Outputs written before the layout change (issue 19) still work: checkpoints load and evaluate
to the same numbers (`tests/fixtures/legacy/` was written by stop 35's code, see its writer's
docstring), and a build keeps its id, so a finished one is found and reused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.write_legacy_checkpoints import CASES, TEXTS, probe_images
from training.inference import load_inference_model

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy"


@pytest.mark.parametrize(("name", "scorer"), [*((name, "plain") for name in sorted(CASES)), ("smartclip", "masked")])
def test_a_checkpoint_saved_before_the_layout_change_evaluates_the_same(name, scorer):
    loaded = load_inference_model(str(LEGACY / name / "checkpoint_000001"), scorer=scorer)
    expected = np.load(LEGACY / name / ("expected.npz" if scorer == "plain" else f"expected_{scorer}.npz"))
    images = torch.stack([loaded.preprocess(b) for b in probe_images()])
    with torch.no_grad():
        image = loaded.model.encode_image(images)
        text = loaded.model.encode_text(loaded.tokenizer(TEXTS))
        scores = loaded.similarity(image, text)
    np.testing.assert_allclose(image.numpy(), expected["image"], atol=1e-6)
    np.testing.assert_allclose(text.numpy(), expected["text"], atol=1e-6)
    np.testing.assert_allclose(scores.numpy(), expected["scores"], atol=1e-6)
    info = json.loads((LEGACY / name / "expected_info.json").read_text()) | {"scorer": scorer}
    assert {k: json.loads(json.dumps(loaded.info[k], default=str)) for k in info} == info


# Build ids computed by stop 35's code for these inputs: a finished build is found again (and
# reused, with no download) only if moving the pipeline's code leaves its id unchanged.
LEGACY_BUILD_IDS = {"cc12m defaults": "d4addf5290b5028d", "yfcc15m, 64 px, 500 a shard": "a785fafc76b4d2c5"}


def test_a_build_written_before_the_layout_change_keeps_its_id():
    from pipelines import build
    from pipelines.stages import DownloadParams

    params = {
        "cc12m defaults": build.BuildParams(corpus="cc12m"),
        "yfcc15m, 64 px, 500 a shard": build.BuildParams(
            corpus="yfcc15m", shard_size=500, download=DownloadParams(image_size=64), reader={"k": 1}
        ),
    }
    ids = {name: build.compute_build_id(["a" * 64, "b" * 64], p) for name, p in params.items()}
    assert ids == LEGACY_BUILD_IDS
