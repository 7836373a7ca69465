"""The tasks beyond zero-shot top-k and retrieval recall: multi-label mAP, intra-modal mAP,
the modality gap, SugarCrepe accuracy and its averages, and the linear probe, each checked by
hand on tiny inputs and against a naive reference (or CLIP_benchmark's code) on random ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from clip_benchmark.metrics.zeroshot_classification import average_precision_per_class

from evaluation.tasks.compositionality import compute_pair_accuracy, summarize_sugarcrepe
from evaluation.tasks.intra_modal import (
    compute_average_precisions,
    compute_modality_gap,
    compute_retrieval_map,
    compute_text_to_text_map,
    split_first_caption,
)
from evaluation.tasks.linear_probe import LinearProbeConfig, cosine_lr, evaluate_linear_probe
from scoring.zeroshot import compute_average_precision_per_class, compute_multilabel_metrics
from training.methods.topology.spaces import Sphere


def dot(a, b):
    return a @ b.T


# ---------------------------------------------------------------- average precision


def test_average_precision_by_hand():
    # One query, gallery ranked by score: [r, n, r, n, r] -> precision at the relevant ranks
    # 1/1, 2/3, 3/5 -> AP = (1 + 2/3 + 3/5) / 3.
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    relevant = np.array([[True, False, True, False, True]])
    assert compute_average_precisions(scores, relevant)[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # The same gallery shuffled: the ranking, not the storage order, decides.
    perm = np.array([4, 2, 0, 3, 1])
    assert compute_average_precisions(scores[:, perm], relevant[:, perm])[0] == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert compute_average_precisions(scores, np.zeros_like(relevant))[0] == 0.0


def naive_average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    ranked = relevant[np.argsort(-scores)]
    hits, total = 0, 0.0
    for rank, is_relevant in enumerate(ranked, 1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / max(hits, 1)


def test_multilabel_ap_matches_naive_and_clip_benchmark():
    rng = np.random.default_rng(0)
    scores, targets = rng.normal(size=(50, 7)), rng.random((50, 7)) < 0.3
    targets[:, 6] = False  # a class without positives scores 0 on both sides
    ours = compute_average_precision_per_class(scores, targets)
    naive = [naive_average_precision(scores[:, c], targets[:, c]) for c in range(7)]
    theirs = average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(targets.astype(np.int64)))
    np.testing.assert_allclose(ours, naive, atol=1e-12)
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-6)
    assert compute_multilabel_metrics(scores, targets)["mean_average_precision"] == pytest.approx(np.mean(naive))
    with pytest.raises(ValueError):
        compute_multilabel_metrics(scores, targets[:, :3])


# ---------------------------------------------------------------- intra-modal retrieval and gap


def test_image_to_image_map_against_naive_loop():
    rng = np.random.default_rng(1)
    queries, gallery = rng.normal(size=(9, 4)), rng.normal(size=(20, 4))
    q_labels, g_labels = rng.integers(0, 3, 9), rng.integers(0, 3, 20)
    naive = np.mean([naive_average_precision(gallery @ q, g_labels == label) for q, label in zip(queries, q_labels)])
    for block in (1, 4, 256):
        assert compute_retrieval_map(queries, q_labels, gallery, g_labels, dot, block_size=block) == pytest.approx(
            naive
        )


def naive_precision_metrics(scores: np.ndarray, relevant: np.ndarray) -> tuple[float, float, float]:
    """(AP, mAP@R, R-precision) of one query by the definitions, rank by rank."""
    ranked = relevant[np.argsort(-scores, kind="stable")]
    r = int(ranked.sum())
    if r == 0:
        return 0.0, 0.0, 0.0
    hits, ap, ap_at_r = 0, 0.0, 0.0
    for rank, is_relevant in enumerate(ranked, 1):
        hits += int(is_relevant)
        if is_relevant:
            ap += hits / rank
            ap_at_r += hits / rank if rank <= r else 0.0
    return ap / r, ap_at_r / r, ranked[:r].sum() / r


def test_map_at_r_and_r_precision_against_naive_loop():
    from evaluation.tasks.intra_modal import compute_retrieval_metrics

    rng = np.random.default_rng(5)
    queries, gallery = rng.normal(size=(11, 4)), rng.normal(size=(25, 4))
    q_labels, g_labels = rng.integers(0, 4, 11), rng.integers(0, 3, 25)  # label 3: no relevant item
    naive = np.array([naive_precision_metrics(gallery @ q, g_labels == label) for q, label in zip(queries, q_labels)])
    for block in (1, 4, 256):
        got = compute_retrieval_metrics(queries, q_labels, gallery, g_labels, dot, block_size=block)
        assert [got["mAP"], got["mAP@R"], got["R-precision"]] == pytest.approx(naive.mean(axis=0).tolist())


def test_hand_made_ranking_metrics():
    """Gallery ranked (relevant, not, relevant, not): AP = (1 + 2/3) / 2, R = 2, so
    R-precision = 1/2 and mAP@R = (1/1) / 2."""
    from evaluation.tasks.intra_modal import compute_precision_metrics

    got = compute_precision_metrics(np.array([[4.0, 3.0, 2.0, 1.0]]), np.array([[True, False, True, False]]))
    assert got["mAP"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert got["R-precision"][0] == pytest.approx(0.5) and got["mAP@R"][0] == pytest.approx(0.5)


def test_query_removed_from_its_own_gallery():
    """Query and gallery from one split (CUB, SOP): the query, its own best match, must not
    count; the result equals ranking the gallery without it."""
    from evaluation.tasks.intra_modal import compute_retrieval_metrics

    rng = np.random.default_rng(6)
    items, labels = rng.normal(size=(12, 4)), np.arange(12) % 3
    ids = np.arange(12)
    got = compute_retrieval_metrics(items, labels, items, labels, dot, query_ids=ids, gallery_ids=ids, block_size=5)
    without = np.array(
        [
            naive_precision_metrics(np.delete(items, i, 0) @ items[i], np.delete(labels, i) == labels[i])
            for i in range(12)
        ]
    )
    assert [got["mAP"], got["mAP@R"], got["R-precision"]] == pytest.approx(without.mean(axis=0).tolist())
    kept = compute_retrieval_metrics(items, labels, items, labels, dot)
    assert kept["mAP"] > got["mAP"]  # keeping itself, each query finds a relevant item first


def test_same_split_image_retrieval_entry_removes_the_query():
    from evaluation.task_registry import Benchmark, requests, score
    from scoring.sets.classification import ClassificationSet
    from evaluation.tasks.intra_modal import compute_retrieval_metrics

    test = ClassificationSet("cub", [f"i{i}" for i in range(6)], np.arange(6) % 2, ["a", "b"], [])
    bench = Benchmark("cub", "image_retrieval", {"test": test}, {"gallery": "test"})
    assert set(requests(bench)) == {"gallery", "test"}
    features = {"test": np.eye(6)[[0, 1, 0, 1, 0, 1]] + 0.1, "gallery": np.eye(6)}
    result = score(bench, features, Sphere(6))
    ids = np.arange(6)
    want = compute_retrieval_metrics(
        features["test"], test.labels, features["gallery"], test.labels, dot, query_ids=ids, gallery_ids=ids
    )
    assert {k: result[k] for k in want} == pytest.approx(want)
    assert "query removed" in result["protocol"] and result["n_gallery"] == 5
    with pytest.raises(ValueError, match="unknown gallery 'val'"):
        requests(Benchmark("cub", "image_retrieval", {"test": test}, {"gallery": "val"}))
    from evaluation.task_registry import benchmark_roles

    assert benchmark_roles("image_retrieval", {"gallery": "test"}) == ("test",)  # no train split read
    assert benchmark_roles("image_retrieval", {}) == ("train", "test")


def test_inverted_caption_queries_replace_the_first_captions():
    text_to_image = np.array([0, 0, 1, 1])
    features = np.eye(2)[text_to_image]
    assert compute_text_to_text_map(features, text_to_image, dot) == pytest.approx(1.0)
    swapped = np.eye(2)[[1, 0]]  # image 0's query now points at image 1's captions
    assert compute_text_to_text_map(features, text_to_image, dot, query_features=swapped) == pytest.approx(0.5)


def test_text_to_text_first_caption_queries_the_rest():
    text_to_image = np.array([0, 0, 0, 1, 1, 2, 2])
    queries, gallery = split_first_caption(text_to_image)
    np.testing.assert_array_equal(queries, [0, 3, 5])
    np.testing.assert_array_equal(gallery, [1, 2, 4, 6])
    # Captions as one-hot image ids: each query finds exactly its own image's captions first.
    features = np.eye(3)[text_to_image]
    assert compute_text_to_text_map(features, text_to_image, dot) == pytest.approx(1.0)


def test_modality_gap_by_hand():
    images = np.array([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    texts = np.array([[-3.0, 0.0], [0.0, -1.0], [0.0, -5.0]])  # -e1, -e2, -e2
    text_to_image = np.array([0, 1, 1])
    # image mean over pairs: (e1 + 2 e2) / 3; text mean: -(e1 + 2 e2) / 3; gap = 2 |(1, 2)| / 3
    assert compute_modality_gap(images, texts, text_to_image) == pytest.approx(2 * np.sqrt(5) / 3)


# ---------------------------------------------------------------- SugarCrepe


def test_pair_accuracy_ties_are_misses():
    assert compute_pair_accuracy(np.array([0.5, 0.2, 0.3]), np.array([0.4, 0.2, 0.9])) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        compute_pair_accuracy(np.array([np.nan]), np.array([0.0]))


def test_sugarcrepe_averages():
    accuracies = {
        "replace_obj": 0.9,
        "replace_att": 0.8,
        "replace_rel": 0.7,
        "swap_obj": 0.6,
        "swap_att": 0.5,
        "add_obj": 0.4,
        "add_att": 0.3,
    }
    summary = summarize_sugarcrepe(accuracies)
    assert summary["average_object"] == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    assert summary["average_attribute"] == pytest.approx((0.8 + 0.5 + 0.3) / 3)
    assert summary["average_relation"] == pytest.approx(0.7)
    assert summary["average_replace"] == pytest.approx(0.8) and summary["average_add"] == pytest.approx(0.35)
    assert summary["average"] == pytest.approx(0.6)


# ---------------------------------------------------------------- linear probe


def test_cosine_schedule_without_warmup():
    assert [cosine_lr(0.1, s, 4) for s in (0, 2, 4)] == pytest.approx([0.1, 0.05, 0.0])


@pytest.mark.usefixtures("single_torch_thread")
def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 8)) * 3
    train_y, test_y = np.arange(200) % 4, np.arange(40) % 4
    train_x = centres[train_y] + rng.normal(size=(200, 8))
    test_x = centres[test_y] + rng.normal(size=(40, 8))
    metrics = evaluate_linear_probe(train_x, train_y, test_x, test_y, 4, LinearProbeConfig(epochs=5))
    assert metrics["top1"] > 0.9
    shuffled = evaluate_linear_probe(train_x, rng.permutation(train_y), test_x, test_y, 4, LinearProbeConfig(epochs=5))
    assert shuffled["top1"] < 0.6  # labels carrying no signal: the probe cannot generalise


def test_inverted_queries_are_embedding_requests_keyed_by_their_settings():
    from evaluation.task_registry import Benchmark, requests, score
    from scoring.sets.classification import ClassificationSet
    from evaluation.inversion import requested_inversion

    rng = np.random.default_rng(4)
    test = ClassificationSet("t", ["q"] * 5, np.arange(5) % 3, ["a", "b", "c"], [])
    train = ClassificationSet("t", ["g"] * 12, np.arange(12) % 3, ["a", "b", "c"], [])
    oti = Benchmark(
        "t", "image_retrieval", {"train": train, "test": test}, {"query": "oti", "inversion": {"steps": 20}}
    )
    wanted = requests(oti)
    assert wanted["train"][0] == "image" and wanted["test"][0].startswith("oti-")
    assert requested_inversion(wanted["test"][0]).num_steps == 20
    other = Benchmark("t", "image_retrieval", {"train": train, "test": test}, {"query": "oti"})
    assert requests(other)["test"][0] != wanted["test"][0]  # other settings, other cache key
    features = {"test": rng.normal(size=(5, 4)), "train": rng.normal(size=(12, 4))}
    result = score(oti, features, Sphere(4))
    assert result["mAP"] == pytest.approx(
        compute_retrieval_map(features["test"], test.labels, features["train"], train.labels, dot)
    )
    assert "oti test queries" in result["protocol"]
    with pytest.raises(ValueError, match="unknown image query 'ovi'"):
        requests(Benchmark("t", "image_retrieval", {"train": train, "test": test}, {"query": "ovi"}))


def test_probe_schedule_warms_up_then_follows_the_cosine():
    assert [round(cosine_lr(1.0, s, 10, warmup_steps=2), 6) for s in (0, 1)] == [0.5, 1.0]
    assert cosine_lr(1.0, 2, 10, warmup_steps=2) == pytest.approx(1.0)
    assert cosine_lr(1.0, 6, 10, warmup_steps=2) == pytest.approx(0.5)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)  # no warm-up: the old schedule


def test_sgd_probe_learns_separable_classes():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 6)) * 4
    y = np.arange(60) % 3
    x = centres[y] + rng.normal(size=(60, 6))
    config = LinearProbeConfig(epochs=20, lr=1.0, optimizer="sgd", warmup_epochs=2, batch_size=16)
    assert evaluate_linear_probe(x, y, x, y, 3, config)["top1"] > 0.9
    assert config.describe("class_states") == "sgd-lr1.0-bs16-ep20-warmup2-class_states"


def test_ovi_caption_queries_are_a_request_of_the_first_captions():
    from evaluation.task_registry import Benchmark, requests
    from scoring.sets.retrieval import RetrievalSet

    data = RetrievalSet("r", "hand-made", ["i0", "i1"], ["a", "b", "c", "d"], np.array([0, 0, 1, 1]))
    wanted = requests(Benchmark("r", "text_retrieval", {"test": data}, {"query": "ovi"}))
    assert wanted["queries"][0].startswith("ovi-") and wanted["queries"][1] == ["a", "c"]
    assert "queries" not in requests(Benchmark("r", "text_retrieval", {"test": data}))


def test_zero_shot_and_retrieval_controls_invert_one_side():
    """Cross the Gap's controls: zero-shot through OTI images or OVI prompts, and image-text
    retrieval with an inverted side, are the same tasks with one side's request inverted."""
    from evaluation.task_registry import Benchmark, requests, score
    from scoring.sets.classification import ClassificationSet
    from scoring.sets.retrieval import RetrievalSet
    from evaluation.inversion import requested_inversion

    zs = ClassificationSet("z", ["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"], ["a {c}."])
    oti = requests(Benchmark("z", "zeroshot", {"test": zs}, {"query": "oti", "inversion": {"steps": 7}}))
    assert oti["images"][0].startswith("oti-") and oti["prompts"][0] == "text"
    assert requested_inversion(oti["images"][0]).num_steps == 7
    ovi = requests(Benchmark("z", "zeroshot", {"test": zs}, {"query": "ovi"}))
    assert ovi["images"][0] == "image" and ovi["prompts"][0].startswith("ovi-")
    bench = Benchmark("z", "zeroshot", {"test": zs}, {"query": "ovi"})
    features = {"images": np.eye(2)[[0, 1, 0]], "prompts": np.eye(2)}
    entry = score(bench, features, Sphere(2))
    assert entry["top1"] == 1.0 and entry["query"] == "ovi"
    rs = RetrievalSet("r", "karpathy-test", ["i0", "i1"], ["c0", "c1"], np.array([0, 1]))
    wanted = requests(Benchmark("r", "retrieval", {"test": rs}, {"query": "oti"}))
    assert wanted["images"][0].startswith("oti-") and wanted["captions"][0] == "text"
    with pytest.raises(ValueError, match="unknown query 'xyz'"):
        requests(Benchmark("r", "retrieval", {"test": rs}, {"query": "xyz"}))


def test_zero_shot_entry_may_name_its_own_templates(tmp_path):
    """The paper's controls use one template per dataset: options.templates replaces the set's."""
    from evaluation.task_registry import load_benchmark, requests
    from tests.eval_fixtures import write_class_folder

    folder = write_class_folder(tmp_path / "zs", n_per_class=1, n_classes=2)
    bench = load_benchmark(
        {
            "name": "z",
            "task": "zeroshot",
            "test": {"format": "image_folder", "path": str(folder)},
            "options": {"templates": ["itap of a {c}."]},
        }
    )
    assert requests(bench)["prompts"][1] == ["itap of a red thing.", "itap of a green thing."]


def test_native_inverted_mixture_by_hand():
    """options.mix: q = normalise(α·x + (1 − α)·x_inv) for each α; α = 1 is the native
    baseline, α = 0 the inverted queries."""
    from evaluation.task_registry import Benchmark, mixed_queries, requests, score
    from scoring.sets.classification import ClassificationSet
    from evaluation.tasks.intra_modal import compute_retrieval_map

    rng = np.random.default_rng(8)
    test = ClassificationSet("t", [f"q{i}" for i in range(6)], np.arange(6) % 3, ["a", "b", "c"], [])
    train = ClassificationSet("t", [f"g{i}" for i in range(9)], np.arange(9) % 3, ["a", "b", "c"], [])
    bench = Benchmark("t", "image_retrieval", {"train": train, "test": test}, {"query": "oti", "mix": [0.0, 0.5, 1.0]})
    assert requests(bench)["test_native"] == ("image", test.images)
    features = {
        "test": rng.normal(size=(6, 4)),
        "test_native": rng.normal(size=(6, 4)),
        "train": rng.normal(size=(9, 4)),
    }
    entry = score(bench, features, Sphere(4))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    gallery = features["train"]  # the sphere scores by the inner product of (unit) embeddings
    by_hand = {
        a: compute_retrieval_map(
            unit(a * unit(features["test_native"]) + (1 - a) * unit(features["test"])),
            test.labels,
            gallery,
            train.labels,
            dot,
        )
        for a in (0.0, 0.5, 1.0)
    }
    assert entry["mAP_by_alpha"] == pytest.approx({"0": by_hand[0.0], "0.5": by_hand[0.5], "1": by_hand[1.0]})
    assert entry["mAP_by_alpha"]["0"] == pytest.approx(entry["mAP"])  # α = 0: the inverted queries
    np.testing.assert_allclose(
        mixed_queries(features["test_native"], features["test"], 1.0), unit(features["test_native"])
    )
    with pytest.raises(ValueError, match="needs an inverted query"):
        requests(Benchmark("t", "image_retrieval", {"train": train, "test": test}, {"mix": [0.5]}))
