"""Topologies through the jobs, with FLIP patch dropping on (selection and topology combine).
Every topology trains through Ray Train, stops after 2 steps, resumes to 4, and must repeat
exactly the losses of the same worker loop run straight in this process (train.py's own
pieces: seeded init, the worker's Ray Data batch stream, `run_training`); its checkpoint is
then evaluated with its own topology. One worker, so that the in-process reference is the
whole run (two-worker resume: test_train_job.py; two-worker gather-with-grad per topology:
test_topology.py). A Euclidean checkpoint's retrieval is recomputed by hand from its
unnormalised features (a silent fallback to cosine would fail)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from evaluation.task_registry import Benchmark, requests, score
from evaluation.datasets import load_karpathy
from scoring.sets.files import read_image
from scoring.retrieval import compute_retrieval_recall
from tests.eval_fixtures import save_micro_checkpoint
from tests.test_eval_parity import encode_directly
from training import checkpoint, data_mixture, data_stage, export, train
from training.inference import load_inference_model
from training.loop import run_training
from training.model import build_training_model, sample_geometry
from training.objectives import build_objective

pytestmark = pytest.mark.ray

TOPOLOGIES = {"multi": 4, "oblique": 4, "oblique_geodesic": 4, "euclidean": 1}  # kind -> m
STEPS = 4  # logged in windows of 2 (each Ray Train report costs ~2 s here): steps 2 and 4


def run_args(build_uri: str, storage, name: str, kind: str, *extra: str) -> list[str]:
    return [
        "--data",
        build_uri,
        "--method",
        "flip",
        "--arch",
        "clip-micro-p8-32",
        "--num-workers",
        "1",
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--storage",
        str(storage),
        "--run-name",
        name,
        "--log-every",
        "2",
        "--checkpoint-every",
        "100",
        "--set",
        f"topology.kind={kind}",
        "--set",
        f"topology.m={TOPOLOGIES[kind]}",
        *extra,
    ]


def step_losses(storage, name: str) -> dict[int, float]:
    lines = (storage / name / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss/total"] for r in map(json.loads, lines)}


def in_process_losses(argv: list[str], batches: list[dict]) -> dict[int, float]:
    """The one worker's loop of `argv`, straight from step 0, in this process, on `batches`."""
    config = train.build_config(train.parse_args(argv))
    sources = data_mixture.load_sources(config.data.builds)
    loop_config, device = train.plan_steps(config, sources), torch.device("cpu")
    model, optimizer, scheduler = train.build_training_state(config, loop_config, device)
    objective = build_objective(config.loss, config.smartclip, 0, 1, model.topology)
    settings = train.loop_settings(config, loop_config, 0, 1, device, 0)
    losses: dict[int, float] = {}
    run_training(
        model,
        objective,
        optimizer,
        scheduler,
        iter(copy.deepcopy(batches)),
        settings,
        lambda step, metrics, _: losses.__setitem__(step, float(metrics["loss/total"])),
    )
    return losses


def geometry_of(argv: list[str]):
    config = train.build_config(train.parse_args(argv))
    return sample_geometry(build_training_model(config), config.model.arch)


def worker_batches(argv: list[str]) -> list[dict]:
    """The one worker's Ray Data batch stream of `argv` from step 0, its first STEPS batches."""
    config = train.build_config(train.parse_args(argv))
    stream = data_stage.iter_worker_batches(
        config.data,
        config.run.seed,
        config.run.epochs,
        data_mixture.load_sources(config.data.builds),
        0,
        1,
        0,
        geometry_of(argv),
    )
    return [batch for _, batch in zip(range(STEPS), stream)]


@pytest.fixture(scope="module")
def topology_runs(small_build, tmp_path_factory, single_torch_thread):
    """kind -> (storage holding run "<kind>": 2 steps, then resumed to 4, through Ray Train;
    the straight in-process losses of the same run). One torch thread, as in a 1-CPU worker.
    The batch stream depends on the data, run, and model sections (seed, batch size, caption
    policy, text context) and the tower geometry, the same for every topology here (checked):
    it is read once for all the in-process references."""
    storage, runs = tmp_path_factory.mktemp("topology-runs"), {}
    argv = {kind: run_args(small_build[3], storage, kind, kind, "--max-steps", str(STEPS)) for kind in TOPOLOGIES}
    configs = [train.build_config(train.parse_args(a)) for a in argv.values()]
    assert (
        len({(c.data, c.model, c.run.seed, c.run.epochs, geometry_of(a)) for c, a in zip(configs, argv.values())}) == 1
    )
    batches = worker_batches(argv["multi"])
    for kind in TOPOLOGIES:
        train.main(run_args(small_build[3], storage, kind, kind, "--max-steps", "2"))
        train.main(run_args(small_build[3], storage, kind, kind, "--max-steps", str(STEPS), "--resume"))
        runs[kind] = (storage, in_process_losses(argv[kind], batches))
    return runs


@pytest.mark.parametrize("kind", sorted(TOPOLOGIES))
def test_topology_resumes_exactly_through_ray_train(topology_runs, kind):
    storage, straight = topology_runs[kind]
    resumed = step_losses(storage, kind)
    assert sorted(resumed) == [2, STEPS] and all(np.isfinite(list(resumed.values())))
    # each window once, the second logged by the attempt that resumed at step 2 (not from 0)
    lines = [json.loads(x) for x in (storage / kind / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["start_step"]) for r in lines] == [(2, 0), (STEPS, 2)]
    assert resumed == straight  # bitwise: the resumed window (steps 3-4) repeats the uninterrupted run's


@pytest.mark.parametrize("kind", sorted(TOPOLOGIES))
def test_topology_checkpoint_is_saved_and_evaluated_with_its_own_similarity(small_build, topology_runs, kind):
    storage = topology_runs[kind][0]
    state = checkpoint.read_state(checkpoint.fetch_checkpoint(str(storage / kind)))
    assert state["config"]["topology"]["kind"] == kind and state["step"] == STEPS
    uri = str(storage / kind)
    bundle = load_inference_model(uri)
    assert bundle.topology.kind == kind and bundle.info["topology"]["kind"] == kind
    assert bundle.info["topology"]["m"] == TOPOLOGIES[kind]
    dataset = load_karpathy(str(small_build[0].retrieval_dir / "dataset_karpathy.json"))
    bench = Benchmark("demo", "retrieval", {"test": dataset})
    features = {role: encode_directly(uri, modality, values) for role, (modality, values) in requests(bench).items()}
    entry = score(bench, features, bundle.topology)
    by_hand = compute_retrieval_recall(
        bundle.topology.score(features["images"], features["captions"]), dataset.text_to_image
    )
    assert {k: entry[k] for k in by_hand} == by_hand


def test_export_refuses_a_non_sphere_checkpoint(topology_runs, tmp_path):
    with pytest.raises(ValueError, match="topology.kind=multi.*evaluate"):
        export.export_open_clip(str(topology_runs["multi"][0] / "multi"), str(tmp_path / "x.pt"))


def test_euclidean_recalls_recomputed_by_hand_from_unnormalised_features(small_corpus, tmp_path):
    corpus = small_corpus[0]
    uri = str(save_micro_checkpoint(tmp_path / "step_00000001", **{"topology.kind": "euclidean"}))
    dataset = load_karpathy(str(corpus.retrieval_dir / "dataset_karpathy.json"))
    bench = Benchmark("demo", "retrieval", {"test": dataset})
    features = {role: encode_directly(uri, modality, values) for role, (modality, values) in requests(bench).items()}
    bundle = load_inference_model(uri)
    entry = score(bench, features, bundle.topology)
    # By hand: the raw tower outputs, −‖u − v‖ pair by pair.
    with torch.no_grad():
        images = torch.stack([bundle.preprocess(read_image(ref)) for ref in dataset.images])
        u = bundle.model.model.tower.encode_image(images).double().numpy()
        v = bundle.model.model.tower.encode_text(bundle.tokenizer(dataset.captions)).double().numpy()
    assert not np.allclose(np.linalg.norm(u, axis=1), 1.0)  # really unnormalised
    distances = -np.sqrt(((u[:, None, :] - v[None, :, :]) ** 2).sum(axis=-1))
    np.testing.assert_allclose(features["images"], u, rtol=1e-5, atol=1e-5)
    by_hand = compute_retrieval_recall(distances, dataset.text_to_image)
    assert {k: entry[k] for k in by_hand} == by_hand
    cosine = (u / np.linalg.norm(u, axis=1, keepdims=True)) @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    assert not np.array_equal(np.argsort(-cosine, axis=1), np.argsort(-distances, axis=1))


def test_linear_probe_reads_the_concatenated_class_states(tmp_path):
    """A probe entry with {"features": "class_states"} requests the m [CLS] states before the
    projection (m·w wide), a new embedding request the image encoder answers."""
    from evaluation import encoders
    from evaluation.task_registry import IMAGE_STATES
    from scoring.sets.classification import ClassificationSet
    from tests.eval_fixtures import class_image

    uri = str(save_micro_checkpoint(tmp_path / "step_00000001", **{"topology.kind": "multi", "topology.m": 4}))
    images = [class_image(label, i) for label in range(3) for i in range(2)]
    data = ClassificationSet("p", images, np.repeat(np.arange(3), 2), ["a", "b", "c"], [])
    bench = Benchmark("p", "linear_probe", {"train": data, "test": data}, {"features": "class_states"})
    assert {role: modality for role, (modality, _) in requests(bench).items()} == {
        "train": IMAGE_STATES,
        "test": IMAGE_STATES,
    }
    rows = encoders.image_rows(images)
    batch = {key: np.array([r[key] for r in rows], dtype=object) for key in rows[0]}
    states = encoders.ImageEncoder(uri, output="class_states")(batch)[encoders.EMBEDDING]
    bundle = load_inference_model(uri)
    visual = bundle.model.model.tower.visual
    with torch.no_grad():
        pixels = torch.stack([bundle.preprocess(b) for b in images])
        x = visual.transformer(visual._embeds(pixels))
        want = visual.ln_post(x)[:, :4].flatten(1).numpy()
    assert states.shape == (6, 4 * visual.class_embedding.shape[1])
    np.testing.assert_allclose(states, want, rtol=1e-5, atol=1e-5)
    entry = score(bench, {"train": states, "test": states}, bundle.topology)
    assert entry["protocol"].endswith("class_states") and 0 <= entry["top1"] <= 1
