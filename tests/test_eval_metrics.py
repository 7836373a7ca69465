"""Zero-shot and retrieval metrics: hand-worked tiny matrices, then parity with CLIP_benchmark's
own metric code on random embeddings."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as cb_zeroshot
from clip_benchmark.metrics import zeroshot_retrieval as cb_retrieval
from sklearn.metrics import balanced_accuracy_score

from scoring.retrieval import compute_best_positive_ranks, compute_retrieval_recall
from scoring.zeroshot import build_zeroshot_weights, compute_zeroshot_metrics
from training.methods.topology.spaces import Sphere

# ---------------------------------------------------------------- zero-shot, by hand

# 4 images x 3 classes. Rank of the true class = other classes scoring >= it.
HAND_LOGITS = np.array(
    [
        [0.9, 0.1, 0.0],  # label 0: 0.9 is the max            -> rank 0 (hit)
        [0.2, 0.5, 0.3],  # label 2: 0.5 above 0.3              -> rank 1
        [0.1, 0.3, 0.6],  # label 2: 0.6 is the max            -> rank 0 (hit)
        [0.7, 0.2, 0.1],  # label 2: 0.7 and 0.2 above 0.1     -> rank 2
    ]
)
HAND_LABELS = np.array([0, 2, 2, 2])
# top-1 = 2/4 hits = 0.5; top-2 = ranks < 2: 3/4 = 0.75; top-5 clips k to C = 3: 4/4 = 1.0.
# Per-class recall over classes present in the labels (class 1 never occurs, though row 1
# predicts it): class 0 -> 1/1, class 2 -> 1/3 (only row 2) ; mean = (1 + 1/3) / 2 = 2/3.


def test_zeroshot_metrics_by_hand():
    metrics = compute_zeroshot_metrics(HAND_LOGITS, HAND_LABELS, topk=(1, 2, 5))
    assert metrics == pytest.approx({"top1": 0.5, "top2": 0.75, "top5": 1.0, "mean_per_class_recall": 2 / 3})


def test_zeroshot_default_keys():
    assert set(compute_zeroshot_metrics(HAND_LOGITS, HAND_LABELS)) == {"top1", "top5", "mean_per_class_recall"}


def test_zeroshot_ties_count_against_the_true_class():
    # A collapsed model (every logit equal) must not score: each true class has 2 ties above it.
    metrics = compute_zeroshot_metrics(np.zeros((4, 3)), HAND_LABELS, topk=(1, 2, 3))
    assert metrics == {"top1": 0.0, "top2": 0.0, "top3": 1.0, "mean_per_class_recall": 0.0}


@pytest.mark.parametrize("logits", [np.array([[0.1, np.nan, 0.0]] * 4), np.ones((4, 2))])
def test_zeroshot_rejects_bad_logits(logits):
    with pytest.raises(ValueError):
        compute_zeroshot_metrics(logits, HAND_LABELS)  # NaN logits; label 2 with only 2 classes


def test_zeroshot_weights_normalise_each_prompt_then_average_then_renormalise():
    # Prompt embeddings by hand (D = 2); "a y" and "the y" are deliberately not unit length.
    table = {"a x": [1.0, 0.0], "the x": [0.0, 1.0], "a y": [3.0, 4.0], "the y": [6.0, -8.0]}
    seen = []

    def encode_text(prompts):
        seen.append(prompts)
        return np.array([table[p] for p in prompts])

    weights = build_zeroshot_weights(encode_text, ["x", "y"], ["a {c}", "the {c}"], Sphere(1))
    # x: mean([1,0],[0,1]) = [.5,.5]            -> renormalised [1/sqrt2, 1/sqrt2]
    # y: [3,4]/5 = [.6,.8], [6,-8]/10 = [.6,-.8] -> mean [.6, 0] -> renormalised [1, 0]
    #    (averaging before normalising would give [4.5,-2] instead: the order matters)
    np.testing.assert_allclose(weights, [[2**-0.5, 2**-0.5], [1.0, 0.0]], atol=1e-15)
    assert seen == [["a x", "the x"], ["a y", "the y"]]


# ---------------------------------------------------------------- retrieval, by hand

# 3 images x 6 captions, 2 captions per image: caption t belongs to image t // 2.
HAND_SCORES = np.array(
    [
        #  t0   t1   t2   t3   t4   t5
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.0],  # image 0
        [0.5, 0.2, 0.3, 0.1, 0.6, 0.4],  # image 1
        [0.4, 0.3, 0.1, 0.6, 0.2, 0.5],  # image 2
    ]
)
HAND_TEXT_TO_IMAGE = np.array([0, 0, 1, 1, 2, 2])
# Text -> image (one column per caption; rank of its own image among the 3):
#   t0 [.9,.5,.4] img0 -> 0   t1 [.1,.2,.3] img0 -> 2   t2 [.8,.3,.1] img1 -> 1
#   t3 [.2,.1,.6] img1 -> 2   t4 [.3,.6,.2] img2 -> 2   t5 [.0,.4,.5] img2 -> 0
#   R@1 = 2/6, R@2 = 3/6, R@4 = 6/6.
# Image -> text (one row per image; negatives scoring >= its best own caption):
#   image 0: best own t0 = .9, nothing above              -> 0
#   image 1: best own t2 = .3, above: t0 .5, t4 .6, t5 .4  -> 3
#   image 2: best own t5 = .5, above: t3 .6                 -> 1
#   R@1 = 1/3, R@2 = 2/3, R@4 = 3/3.


def test_retrieval_recall_by_hand():
    metrics = compute_retrieval_recall(HAND_SCORES, HAND_TEXT_TO_IMAGE, ks=(1, 2, 4))
    assert metrics == pytest.approx(
        {
            "image_retrieval_recall@1": 2 / 6,
            "image_retrieval_recall@2": 3 / 6,
            "image_retrieval_recall@4": 1.0,
            "text_retrieval_recall@1": 1 / 3,
            "text_retrieval_recall@2": 2 / 3,
            "text_retrieval_recall@4": 1.0,
        }
    )


def test_retrieval_default_ks_and_k_beyond_candidates():
    metrics = compute_retrieval_recall(HAND_SCORES, HAND_TEXT_TO_IMAGE)
    # k = 5 and 10 exceed the 3 images: every caption's image is retrieved.
    assert metrics["image_retrieval_recall@5"] == metrics["image_retrieval_recall@10"] == 1.0
    # Image 1's best caption is 4th of 6 captions: inside the top 5.
    assert metrics["text_retrieval_recall@5"] == 1.0
    assert metrics["text_retrieval_recall@1"] == pytest.approx(1 / 3)


def test_retrieval_ties_count_against_the_query():
    metrics = compute_retrieval_recall(np.zeros((3, 6)), HAND_TEXT_TO_IMAGE, ks=(1, 3, 5))
    # Text query: 2 tied negatives images -> rank 2. Image query: 4 tied negative captions -> rank 4.
    assert metrics == {
        "image_retrieval_recall@1": 0.0,
        "image_retrieval_recall@3": 1.0,
        "image_retrieval_recall@5": 1.0,
        "text_retrieval_recall@1": 0.0,
        "text_retrieval_recall@3": 0.0,
        "text_retrieval_recall@5": 1.0,
    }


def test_image_without_captions_is_a_miss():
    # Image 2 loses its captions: it still competes as a candidate but can never be a hit.
    metrics = compute_retrieval_recall(HAND_SCORES[:, :4], HAND_TEXT_TO_IMAGE[:4], ks=(4,))
    assert metrics["text_retrieval_recall@4"] == pytest.approx(2 / 3)


def test_rank_blocks_do_not_change_the_result():
    rng = np.random.default_rng(0)
    scores, owner = rng.normal(size=(37, 11)), rng.integers(0, 5, size=11)
    ranks = [compute_best_positive_ranks(scores, np.arange(37) % 6, owner, block_size=b) for b in (1, 5, 1024)]
    np.testing.assert_array_equal(ranks[0], ranks[1])
    np.testing.assert_array_equal(ranks[0], ranks[2])


def test_retrieval_rejects_bad_inputs():
    with pytest.raises(ValueError):
        compute_retrieval_recall(HAND_SCORES, HAND_TEXT_TO_IMAGE[:5])
    with pytest.raises(ValueError):
        compute_retrieval_recall(np.where(HAND_SCORES > 0.5, np.nan, HAND_SCORES), HAND_TEXT_TO_IMAGE)


# ---------------------------------------------------------------- parity with CLIP_benchmark


def make_unit_embeddings(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    x = rng.normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def convert_size_one_array_to_float(value) -> float:
    return builtins.float(np.asarray(value).reshape(()))


@pytest.fixture
def numpy2_safe_clip_benchmark_accuracy(monkeypatch):
    """clip_benchmark 1.6.2's `accuracy` ends with `float(<shape (1,) ndarray>)`, a TypeError
    since NumPy 2.x; a module-global `float` that unwraps size-1 arrays runs its code unchanged."""
    monkeypatch.setattr(cb_zeroshot, "float", convert_size_one_array_to_float, raising=False)


def compute_clip_benchmark_zeroshot(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What clip_benchmark's zero-shot `evaluate` returns for these logits (5+ classes)."""
    acc1, acc5 = cb_zeroshot.accuracy(torch.from_numpy(logits), torch.from_numpy(labels), topk=(1, 5))
    mean_per_class_recall = balanced_accuracy_score(labels, logits.argmax(axis=1))
    return {"top1": acc1, "top5": acc5, "mean_per_class_recall": mean_per_class_recall}


@pytest.mark.parametrize("n_images, n_classes, n_label_classes", [(300, 10, 10), (257, 23, 17), (64, 5, 3)])
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.usefixtures("numpy2_safe_clip_benchmark_accuracy")
def test_zeroshot_parity_with_clip_benchmark(n_images, n_classes, n_label_classes):
    rng = np.random.default_rng(n_images)
    image_emb, class_emb = make_unit_embeddings(rng, n_images), make_unit_embeddings(rng, n_classes)
    logits = 100.0 * image_emb @ class_emb.T  # CLIP_benchmark's scale; metrics ignore it
    labels = rng.integers(0, n_label_classes, size=n_images)  # some classes may never occur
    ours = compute_zeroshot_metrics(logits, labels)
    theirs = compute_clip_benchmark_zeroshot(logits, labels)
    assert ours == pytest.approx(theirs, abs=1e-12, rel=0)


def test_zeroshot_weights_parity_with_clip_benchmark():
    rng = np.random.default_rng(1)
    classnames, templates = ["cat", "dog", "red fox"], ["a photo of a {c}.", "a {c}.", "art of the {c}"]
    prompts = [t.format(c=c) for c in classnames for t in templates]
    table = rng.normal(size=(len(prompts), 8))  # not unit length: both sides normalise
    token_of = {p: i for i, p in enumerate(prompts)}

    class LookupModel:
        def encode_text(self, tokens):
            return torch.from_numpy(table)[tokens]

    theirs = cb_zeroshot.zero_shot_classifier(
        LookupModel(), lambda texts: torch.tensor([token_of[t] for t in texts]), classnames, templates, "cpu", amp=False
    )  # (D, C)
    ours = build_zeroshot_weights(lambda texts: table[[token_of[t] for t in texts]], classnames, templates, Sphere(1))
    np.testing.assert_allclose(ours, theirs.numpy().T, rtol=0, atol=1e-12)


def compute_clip_benchmark_recall(
    scores: np.ndarray, text_to_image: np.ndarray, ks: tuple[int, ...], batch_size: int
) -> tuple[dict[str, float], dict[str, float]]:
    """CLIP_benchmark's retrieval `evaluate` from the score step on, with its own functions.

    Returns (float64 means, its reported float32 means): it averages hits with `.float()`,
    so its reported numbers carry float32 rounding (~1e-8); the hits themselves are exact.
    """
    texts_scores = torch.from_numpy(scores.T)  # (n_texts, n_images), as its `scores`
    positive_pairs = torch.zeros_like(texts_scores, dtype=bool)
    positive_pairs[torch.arange(len(texts_scores)), torch.from_numpy(text_to_image)] = True
    exact, reported = {}, {}
    recall_at_k, batchify = cb_retrieval.recall_at_k, cb_retrieval.batchify
    for k in ks:
        image_hits = batchify(recall_at_k, texts_scores, positive_pairs, batch_size, "cpu", k=k) > 0
        text_hits = batchify(recall_at_k, texts_scores.T, positive_pairs.T, batch_size, "cpu", k=k) > 0
        for key, hits in ((f"image_retrieval_recall@{k}", image_hits), (f"text_retrieval_recall@{k}", text_hits)):
            exact[key] = hits.double().mean().item()
            reported[key] = hits.float().mean().item()
    return exact, reported


def make_uneven_text_to_image(rng: np.random.Generator, n_images: int) -> np.ndarray:
    """1 to 7 captions per image, image 3 with none, captions shuffled out of image order."""
    counts = rng.integers(1, 8, size=n_images)
    counts[3] = 0
    return rng.permutation(np.repeat(np.arange(n_images), counts))


@pytest.mark.parametrize("uneven", [False, True])
def test_retrieval_parity_with_clip_benchmark(uneven):
    rng = np.random.default_rng(7)
    n_images = 60
    text_to_image = make_uneven_text_to_image(rng, n_images) if uneven else np.repeat(np.arange(n_images), 5)
    image_emb, text_emb = make_unit_embeddings(rng, n_images), make_unit_embeddings(rng, len(text_to_image))
    # Make the matching pairs likelier so the recalls are not all near chance.
    text_emb = text_emb + 0.8 * image_emb[text_to_image]
    scores = image_emb @ text_emb.T  # (n_images, n_texts)
    ks = (1, 5, 10)
    ours = compute_retrieval_recall(scores, text_to_image, ks)
    exact, reported = compute_clip_benchmark_recall(scores, text_to_image, ks, batch_size=7)
    assert ours.keys() == exact.keys()
    for key in ours:
        assert abs(ours[key] - exact[key]) <= 1e-12, key
        assert ours[key] == pytest.approx(reported[key], abs=1e-6), key
    assert 0.0 < ours["text_retrieval_recall@1"] < 1.0  # the case is not degenerate
