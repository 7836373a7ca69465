"""Agreement with CLIP_benchmark on the same model and fixtures: CLIP_benchmark's own
`zeroshot_classification`, `zeroshot_retrieval`, `image_caption_selection` (SugarCrepe) and
`linear_probe` code, fed through its own WebDataset / SugarCrepe readers, against our readers,
encoders and tasks on a micro checkpoint. Accuracies and recalls must be equal (CLIP_benchmark
averages hits in float32, so we compare hit counts); multi-label mAP to float32 precision; the
linear probe to 0.5 percentage point (same protocol, seed and shuffling; float summation order
may differ). Finally the checkpoint exported for open_clip gives the same features, which is how
CLIP_benchmark itself evaluates our models (README)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
from clip_benchmark.datasets.sugar_crepe import SugarCrepe
from clip_benchmark.metrics import image_caption_selection as cb_selection
from clip_benchmark.metrics import linear_probe as cb_linear_probe
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from torch.utils.data import DataLoader

from evaluation import encoders
from evaluation.task_registry import Benchmark, requests, score
from evaluation.datasets import load_sugarcrepe, load_wds
from evaluation.tasks.linear_probe import LinearProbeConfig, evaluate_linear_probe
from tests.eval_fixtures import CLASSNAMES, TEMPLATES, class_image, save_micro_checkpoint
from tests.test_eval_metrics import numpy2_safe_clip_benchmark_accuracy  # noqa: F401 (fixture)
from tests.test_eval_readers import write_sugarcrepe, write_wds
from training.inference import load_inference_model

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def model_uri(tmp_path_factory) -> str:
    return str(save_micro_checkpoint(tmp_path_factory.mktemp("parity") / "step_00000001", seed=11))


@pytest.fixture(scope="module")
def bundle(model_uri):
    return load_inference_model(model_uri)


def encode_directly(model_uri: str, modality: str, values: list) -> np.ndarray:
    """Our encoders on one batch, as the Ray actors call them."""
    if modality == "image":
        rows = encoders.image_rows(values)
        batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
        return encoders.ImageEncoder(model_uri)(batch)[encoders.EMBEDDING]
    return encoders.TextEncoder(model_uri)(
        {encoders.INDEX: np.arange(len(values)), encoders.TEXT: np.array(values, dtype=object)}
    )[encoders.EMBEDDING]


def our_scores(model_uri: str, bench: Benchmark, topology) -> dict:
    features = {role: encode_directly(model_uri, m, values) for role, (m, values) in requests(bench).items()}
    return score(bench, features, topology)


def clip_benchmark_transform(bundle):
    """PIL image (as CLIP_benchmark decodes it) -> our preprocessing, through lossless PNG."""

    def transform(image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return bundle.preprocess(buf.getvalue())

    return transform


def write_zeroshot_wds(root, n_per_class: int = 4, multilabel: bool = False):
    rng = np.random.default_rng(3)
    samples = []
    for i in range(len(CLASSNAMES) * n_per_class):
        label = i % len(CLASSNAMES)
        if multilabel:
            buf = io.BytesIO()
            vector = (rng.random(len(CLASSNAMES)) < 0.3).astype(np.int64)
            vector[label] = 1
            np.save(buf, vector)
            samples.append({"png": class_image(label, i), "npy": buf.getvalue()})
        else:
            samples.append({"png": class_image(label, i), "cls": str(label).encode()})
    return write_wds(
        root,
        "test",
        samples,
        per_shard=7,
        dataset_type="multilabel" if multilabel else None,
        classnames=CLASSNAMES,
        templates=TEMPLATES,
    )


@pytest.mark.usefixtures("numpy2_safe_clip_benchmark_accuracy")
def test_zeroshot_classification_agrees(tmp_path, model_uri, bundle):
    root = write_zeroshot_wds(tmp_path / "wds_colours")
    dataset = load_wds(str(root))
    ours = our_scores(model_uri, Benchmark("colours", "zeroshot", {"test": dataset}), bundle.topology)
    loader = DataLoader(
        build_wds_dataset("colours", clip_benchmark_transform(bundle), data_dir=str(root)), batch_size=5
    )
    theirs = cb_zeroshot.evaluate(bundle.model, loader, bundle.tokenizer, CLASSNAMES, TEMPLATES, "cpu", amp=False)
    n = dataset.n_images
    assert round(ours["top1"] * n) == round(theirs["acc1"] * n)
    assert round(ours["top5"] * n) == round(theirs["acc5"] * n)
    assert ours["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-12)
    assert 0 < ours["top5"] < 1  # not a degenerate case


def test_multilabel_map_agrees(tmp_path, model_uri, bundle):
    root = write_zeroshot_wds(tmp_path / "wds_voc", multilabel=True)
    dataset = load_wds(str(root))
    ours = our_scores(model_uri, Benchmark("voc", "zeroshot", {"test": dataset}), bundle.topology)
    loader = DataLoader(build_wds_dataset("voc", clip_benchmark_transform(bundle), data_dir=str(root)), batch_size=5)
    theirs = cb_zeroshot.evaluate(bundle.model, loader, bundle.tokenizer, CLASSNAMES, TEMPLATES, "cpu", amp=False)
    assert ours["mean_average_precision"] == pytest.approx(theirs["mean_average_precision"], abs=1e-6)


def test_retrieval_agrees(tmp_path, model_uri, bundle):
    groups = [
        [f"a {CLASSNAMES[i % 6]} number {i}", f"the {CLASSNAMES[i % 6]}", f"picture {i}"][: 1 + i % 3]
        for i in range(14)
    ]
    samples = [{"png": class_image(i % 6, 60 + i), "txt": "\n".join(g).encode()} for i, g in enumerate(groups)]
    root = write_wds(tmp_path / "wds_captions", "test", samples, per_shard=5, dataset_type="retrieval")
    dataset = load_wds(str(root))
    ours = our_scores(model_uri, Benchmark("captions", "retrieval", {"test": dataset}), bundle.topology)
    loader = DataLoader(
        build_wds_dataset("captions", clip_benchmark_transform(bundle), data_dir=str(root)),
        batch_size=4,
        collate_fn=image_captions_collate_fn,
    )
    theirs = cb_retrieval.evaluate(bundle.model, loader, bundle.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        for key, n in (
            (f"image_retrieval_recall@{k}", dataset.n_texts),
            (f"text_retrieval_recall@{k}", dataset.n_images),
        ):
            assert round(ours[key] * n) == round(theirs[key] * n), key


def test_sugarcrepe_agrees(tmp_path, model_uri, bundle):
    root = write_sugarcrepe(tmp_path / "sugar_crepe")
    composition = load_sugarcrepe(str(root))
    ours = our_scores(model_uri, Benchmark("sugarcrepe", "compositionality", {"test": composition}), bundle.topology)
    for subset in composition.subsets:
        dataset = SugarCrepe(
            str(root / "val2017"), str(root / f"{subset}.json"), transform=clip_benchmark_transform(bundle)
        )
        loader = DataLoader(dataset, batch_size=2, collate_fn=image_captions_collate_fn)
        theirs = cb_selection.evaluate(bundle.model, loader, bundle.tokenizer, "cpu", amp=False)
        assert ours[subset] == theirs["acc"], subset


NOISE = 300.0  # pixel noise (std) of the linear-probe images


@pytest.fixture
def clip_benchmark_on_cpu(monkeypatch):
    """CLIP_benchmark's linear-probe `train` hard-codes `.cuda()`; on a CPU-only machine make
    `.cuda()` a no-op (DataParallel without GPUs already runs the module as is)."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)


@pytest.mark.usefixtures("numpy2_safe_clip_benchmark_accuracy", "clip_benchmark_on_cpu")
def test_linear_probe_agrees(model_uri):
    n_classes = len(CLASSNAMES)
    # Heavy noise, so the probe is neither perfect nor at chance.
    train_images = [class_image(i % n_classes, 500 + i, noise=NOISE) for i in range(96)]
    test_images = [class_image(i % n_classes, 900 + i, noise=NOISE) for i in range(36)]
    train_x, test_x = (
        encode_directly(model_uri, "image", train_images),
        encode_directly(model_uri, "image", test_images),
    )
    train_y, test_y = np.arange(96) % n_classes, np.arange(36) % n_classes
    config = LinearProbeConfig(epochs=4, lr=0.1, batch_size=16, seed=0)
    ours = evaluate_linear_probe(train_x, train_y, test_x, test_y, n_classes, config)

    # CLIP_benchmark's own train/infer on the same cached features (its evaluate() without the
    # validation sweep, which is what the PGS protocol runs).
    features = cb_linear_probe.FeatureDataset(torch.from_numpy(train_x), torch.from_numpy(train_y))
    loader = DataLoader(features, batch_size=config.batch_size, shuffle=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = cb_linear_probe.train(
        loader, train_x.shape[1], n_classes, 0.0, config.lr, config.epochs, False, device, config.seed
    )
    test_loader = DataLoader(
        cb_linear_probe.FeatureDataset(torch.from_numpy(test_x), torch.from_numpy(test_y)), batch_size=config.batch_size
    )
    logits, target = cb_linear_probe.infer(model, test_loader, False, device)
    acc1, acc5 = cb_zeroshot.accuracy(logits.float().cpu(), target.cpu(), topk=(1, 5))
    assert ours["top1"] == pytest.approx(acc1, abs=0.005)
    assert ours["top5"] == pytest.approx(acc5, abs=0.005)
    assert 0.3 < ours["top1"] < 1.0  # neither chance nor perfect: the comparison means something


def test_open_clip_export_gives_the_same_features(tmp_path, model_uri, bundle):
    import open_clip

    from training.export import export_open_clip
    from training.towers import register_tiny_configs

    register_tiny_configs()
    exported = export_open_clip(model_uri, str(tmp_path / "micro.pt"))
    model, _, _ = open_clip.create_model_and_transforms(bundle.info["arch"], pretrained=exported)
    model.eval()
    pixels = torch.stack([bundle.preprocess(class_image(label, 7)) for label in range(6)])
    tokens = bundle.tokenizer(["a photo of a red thing.", "art"])
    with torch.no_grad():
        # bundle.model returns the sphere's embeddings: open_clip's normalised features
        torch.testing.assert_close(model.encode_image(pixels, normalize=True), bundle.model.encode_image(pixels))
        torch.testing.assert_close(model.encode_text(tokens, normalize=True), bundle.model.encode_text(tokens))
