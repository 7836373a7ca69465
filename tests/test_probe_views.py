"""Augmented linear-probe views (evaluation/probe_views.py): drawn from (seed, image, view)
alone, encoded by the image encoder as one request, read one view per epoch by the probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation import encoders
from evaluation.task_registry import IMAGE_STATES, Benchmark, requests
from scoring.sets.classification import ClassificationSet
from evaluation.probe_views import ViewAugmenter, ViewConfig, requested_views
from evaluation.tasks.linear_probe import LinearProbeConfig, train_linear_probe
from tests.eval_fixtures import class_image, save_micro_checkpoint


def test_views_are_seeded_by_image_and_view_alone():
    augment = ViewAugmenter(ViewConfig(views=3), 32)
    image = class_image(1, 0)
    first = augment(image, "img-a", 0)
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, augment(image, "img-a", 0))
    assert not torch.equal(first, augment(image, "img-a", 1))
    assert not torch.equal(first, augment(image, "img-b", 0))


def test_one_view_probes_like_plain_features():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)).astype(np.float32), np.arange(30) % 3
    config = LinearProbeConfig(epochs=3, batch_size=8)
    plain, viewed = train_linear_probe(x, y, 3, config), train_linear_probe(x[:, None], y, 3, config)
    assert torch.equal(plain.weight, viewed.weight)
    two = train_linear_probe(np.stack([x, -x], axis=1), y, 3, config)  # epoch 1 reads the negated view
    assert not torch.equal(plain.weight, two.weight)


def test_views_are_a_request_and_the_encoder_concatenates_them(tmp_path):
    uri = str(save_micro_checkpoint(tmp_path / "step_00000001"))
    images = [class_image(label, 0) for label in range(3)]
    data = ClassificationSet("c", images, np.arange(3), ["a", "b", "c"], [])
    bench = Benchmark(
        "c", "linear_probe", {"train": data, "test": data}, {"features": "class_states", "views": {"views": 2}}
    )
    wanted = requests(bench)
    assert wanted["test"][0] == IMAGE_STATES and requested_views(wanted["train"][0]).views == 2
    with pytest.raises(ValueError, match="class_states"):
        requests(Benchmark("c", "linear_probe", {"train": data, "test": data}, {"views": 2}))
    rows = encoders.image_rows(images)
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    encoder = encoders.ImageEncoder(uri, output="class_states", views={"views": 2})
    got = encoder(batch)[encoders.EMBEDDING]
    augment, model = ViewAugmenter(ViewConfig(views=2), 32), encoder.bundle.model
    with torch.no_grad():
        for v in range(2):
            pixels = torch.stack([augment(b, encoders.image_identity("", b), v) for b in images])
            want = model.encode_image_states(pixels).numpy()
            np.testing.assert_allclose(got[:, v * want.shape[1] : (v + 1) * want.shape[1]], want, rtol=1e-5, atol=1e-5)
