"""An off-the-shelf open_clip model in the evaluation job (`--open-clip ARCH=WEIGHTS`): on an
open_clip weights file the test writes, its features are open_clip's own (its preprocessing,
its tokenizer, normalised), and the job scores it and names it in the report."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from evaluation import evaluate
from tests.eval_fixtures import CLASSNAMES, TEMPLATES, class_image, write_class_folder
from training.inference import load_inference_model
from training.off_the_shelf import parse_open_clip_ref
from training.towers import build_tower_model, register_tiny_configs

ARCH = "clip-micro-p8-32"


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """An open_clip file of random weights, as a user's downloaded checkpoint would be."""
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("open_clip") / "micro.bin"
    torch.save(build_tower_model(ARCH).state_dict(), path)
    return path


def test_features_are_open_clips_own(weights_file, tmp_path):
    register_tiny_configs()
    bundle = load_inference_model(f"open_clip:{ARCH}={weights_file}")
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=str(weights_file))
    model.eval()
    image = class_image(2, 0)
    (tmp_path / "x.png").write_bytes(image)
    with torch.no_grad():
        want_image = model.encode_image(preprocess(Image.open(tmp_path / "x.png")).unsqueeze(0), normalize=True)
        want_text = model.encode_text(open_clip.get_tokenizer(ARCH)(["a blue thing"]), normalize=True)
        got_image = bundle.model.encode_image(bundle.preprocess(image).unsqueeze(0))
        got_text = bundle.model.encode_text(bundle.tokenizer(["a blue thing"]))
    torch.testing.assert_close(got_image, want_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_text, want_text, rtol=1e-5, atol=1e-6)
    assert bundle.info["method"] == "open_clip" and bundle.topology.kind == "sphere"
    assert len(bundle.info["weights_sha256"]) == 64


def test_malformed_specs_and_masked_scorer_are_refused(weights_file):
    with pytest.raises(ValueError, match="ARCH=WEIGHTS"):
        parse_open_clip_ref("open_clip:ViT-B-32")
    with pytest.raises(ValueError, match="an open_clip model scores by cosine"):
        load_inference_model(f"open_clip:{ARCH}={weights_file}", scorer="masked")
    with pytest.raises(SystemExit):  # argparse: exactly one of --checkpoint / --open-clip
        evaluate.parse_args(["--checkpoint", "x", "--open-clip", f"{ARCH}=y", "--output", "o"])


def test_evaluation_job_scores_an_open_clip_file(ray_session, weights_file, tmp_path):
    folder = write_class_folder(tmp_path / "zs", n_per_class=3)
    report = evaluate.main(
        [
            "--open-clip",
            f"{ARCH}={weights_file}",
            "--zeroshot",
            str(folder),
            "--output",
            str(tmp_path / "report"),
            "--cache",
            "none",
            "--batch-size",
            "8",
        ]
    )
    assert report["checkpoint"]["path"] == f"open_clip:{ARCH}={weights_file}"
    entry = next(iter(report["zeroshot"].values()))
    bundle = load_inference_model(f"open_clip:{ARCH}={weights_file}")
    images = [class_image(label, i) for label in range(len(CLASSNAMES)) for i in range(3)]
    with torch.no_grad():
        feats = bundle.model.encode_image(torch.stack([bundle.preprocess(b) for b in images])).numpy()
        prompts = [[t.replace("{c}", c) for t in TEMPLATES] for c in CLASSNAMES]
        classes = np.stack([bundle.model.encode_text(bundle.tokenizer(p)).mean(0).numpy() for p in prompts])
    classes /= np.linalg.norm(classes, axis=1, keepdims=True)
    top1 = float(((feats @ classes.T).argmax(1) == np.repeat(np.arange(len(CLASSNAMES)), 3)).mean())
    assert entry["top1"] == pytest.approx(top1)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"open_clip:{ARCH}=" in markdown and "- Method: open_clip" in markdown
    from evaluation.figures import run_directories

    assert run_directories(report["checkpoint"]) == []  # no training curves to look for
