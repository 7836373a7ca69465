"""In-run evaluation (training/in_run_eval.py): the figures it logs are the evaluation job's
for the same weights (same readers, preprocessing, tokenizer and scoring functions), the
round-robin shares gather back in set order, and bad settings are refused up front."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation import encoders, task_registry
from scoring.sets.files import Location
from tests.eval_fixtures import save_micro_checkpoint, write_class_folder, write_karpathy
from training.collectives import interleave_shares
from training.config import EvalConfig
from training.in_run_eval import InRunEvaluator, check_eval_config, parse_set, share
from training.inference import load_inference_model


def evaluation_job_figures(checkpoint_uri: str, entry: dict) -> dict:
    """One suite entry scored the evaluation job's way: its readers, its encoders (Ray Data's
    actors, called in-process), `task_registry.score`."""
    bench = task_registry.load_benchmark(entry)
    features = {}
    for role, (modality, values) in task_registry.requests(bench).items():
        is_image = modality == task_registry.IMAGE
        encoder = encoders.ImageEncoder(checkpoint_uri) if is_image else encoders.TextEncoder(checkpoint_uri)
        rows = encoders.image_rows(values) if is_image else encoders.text_rows(values)
        columns = {
            k: np.array([r[k] for r in rows], dtype=object if k != encoders.INDEX else np.int64) for k in rows[0]
        }
        features[role] = encoder(columns)[encoders.EMBEDDING]
    return task_registry.score(bench, features, load_inference_model(checkpoint_uri).topology)


def in_run_figures(checkpoint_uri: str, sets: tuple[str, ...], world: int = 1) -> dict:
    """The evaluator on the checkpoint's model; with world > 1 each simulated worker embeds its
    share and the shares are interleaved as the all-gather would."""
    bundle = load_inference_model(checkpoint_uri)
    model = bundle.model.model  # the ContrastiveModel inside the plain scorer
    config = EvalConfig(every=1, sets=sets, batch_size=7)
    evaluators = [
        InRunEvaluator(config, bundle.preprocess.image_size, bundle.tokenizer, r, world, torch.device("cpu"))
        for r in range(world)
    ]
    if world == 1:
        return evaluators[0](model)
    figures = {}
    with torch.no_grad():
        for i, part in enumerate(evaluators[0].sets):
            shares = [ev.sets[i] for ev in evaluators]
            images = interleave_shares([model.embed_image(s.images) for s in shares], part.n_images)
            texts = interleave_shares([model.embed_text(s.texts) for s in shares], part.n_texts)
            scored = part.score(images.numpy(), texts.numpy(), model.topology)
            figures.update({f"eval/{part.dataset.name}/{k}": v for k, v in scored.items()})
    return figures


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return str(write_class_folder(root / "colours", n_per_class=3)), str(write_karpathy(root / "shots", 10))


@pytest.mark.parametrize("topology", [{}, {"topology.kind": "oblique", "topology.m": 2}], ids=["sphere", "oblique"])
def test_in_run_figures_are_the_evaluation_jobs(small_sets, tmp_path, topology):
    folder, karpathy = small_sets
    uri = str(save_micro_checkpoint(tmp_path / "run" / "step_00000001", **topology))
    ours = in_run_figures(uri, (f"colours=image_folder:{folder}", f"shots=karpathy:{karpathy}"))
    zeroshot = evaluation_job_figures(
        uri, {"name": "colours", "task": "zeroshot", "test": {"format": "image_folder", "path": folder}}
    )
    retrieval = evaluation_job_figures(
        uri, {"name": "shots", "task": "retrieval", "test": {"format": "karpathy", "path": karpathy}}
    )
    for key in ("top1", "top5", "mean_per_class_recall"):
        assert ours[f"eval/colours/{key}"] == pytest.approx(zeroshot[key], abs=1e-12)
    recalls = [k for k in retrieval if "recall@" in k]
    assert len(recalls) == 6
    for key in recalls:
        assert ours[f"eval/shots/{key}"] == pytest.approx(retrieval[key], abs=1e-12)
    assert set(ours) == {f"eval/colours/{k}" for k in ("top1", "top5", "mean_per_class_recall")} | {
        f"eval/shots/{k}" for k in recalls
    }


def test_three_workers_shares_give_the_one_worker_figures(small_sets, tmp_path):
    folder, karpathy = small_sets  # 18 images, 6 classes x 3 templates, 30 captions: none divides by 3 evenly but 18
    uri = str(save_micro_checkpoint(tmp_path / "run" / "step_00000001"))
    sets = (f"colours=image_folder:{folder}", f"shots=karpathy:{karpathy}")
    one, three = in_run_figures(uri, sets), in_run_figures(uri, sets, world=3)
    assert three == pytest.approx(one, abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 5, 7, 12])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_interleave_back_in_order(n, world):
    items = list(range(n))
    shares = [share(items, r, world) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # every worker runs the same number of forwards
    assert interleave_shares([torch.tensor(s) for s in shares], n).tolist() == items


def test_bad_settings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="NAME=FORMAT:PATH"):
        parse_set("pets:/data")
    with pytest.raises(ValueError, match="unknown format 'folder'"):
        parse_set("pets=folder:/data")
    assert parse_set("coco=karpathy:s3://b/k.json").path == "s3://b/k.json"
    with pytest.raises(ValueError, match="both eval.every"):
        check_eval_config(EvalConfig(every=10))
    with pytest.raises(ValueError, match="both eval.every"):
        check_eval_config(EvalConfig(sets=("a=wds:/x",)))
    with pytest.raises(ValueError, match="names repeat"):
        check_eval_config(EvalConfig(every=5, sets=("a=wds:/x", "a=karpathy:/y")))
    assert check_eval_config(EvalConfig()) == []
    assert Location  # the readers' storage layer is scoring's (imported by training without evaluation)
