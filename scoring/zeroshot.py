"""Zero-shot classification: class weights from prompt templates (CLIP's prompt ensembling) and
top-k / mean per-class recall, defined as in CLIP_benchmark's `zeroshot_classification`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

TOPK = (1, 5)
TOPK_KEY = "top{k}"
MEAN_PER_CLASS_RECALL_KEY = "mean_per_class_recall"
MEAN_AVERAGE_PRECISION_KEY = "mean_average_precision"
ROW_BLOCK_SIZE = 4096  # rows of logits compared at once, bounds the (block, C) temporary

EncodeText = Callable[[list[str]], np.ndarray]  # prompts -> (n, D) embeddings


def fill_templates(templates: Sequence[str], classname: str) -> list[str]:
    """One prompt per template; `format(c=...)` as CLIP_benchmark does, so `{{`/`}}` escapes work alike."""
    return [template.format(c=classname) for template in templates]


def build_zeroshot_weights(
    encode_text: EncodeText, classnames: Sequence[str], templates: Sequence[str], topology
) -> np.ndarray:
    """(C, D) classifier by the topology's template rule (training/methods/topology/spaces.py): on the sphere
    CLIP's prompt ensembling (normalise each prompt embedding, average, normalise again); on
    the inner-product topologies the unnormalised mean of the per-template embeddings. The
    geodesic and Euclidean average distances instead (`Sphere.class_scores`), so they have no
    classifier matrix."""
    prompts = np.stack([np.asarray(encode_text(fill_templates(templates, c)), np.float64) for c in classnames])
    weights = topology.class_embeddings(prompts)
    if weights is None:
        raise ValueError(f"topology {topology.kind} averages distances over templates: use its class_scores")
    return weights


def class_prompts(dataset) -> list[str]:
    """Every class name of a ClassificationSet in every one of its templates, class-major
    (what `class_logits` reshapes back)."""
    return [p for c in dataset.classnames for p in fill_templates(dataset.templates, c)]


def class_logits(dataset, image_features: np.ndarray, prompt_features: np.ndarray, topology) -> np.ndarray:
    """(N, C) class scores of a set's images from the embeddings of its `class_prompts`, by the
    topology's template rule and similarity (training/methods/topology/spaces.py `class_scores`)."""
    prompts = np.asarray(prompt_features).reshape(dataset.n_classes, len(dataset.templates), -1)
    return np.asarray(topology.class_scores(image_features, prompts), np.float64)


def classification_metrics(dataset, logits: np.ndarray) -> dict[str, float]:
    """A set's zero-shot metrics: multi-label mAP, or top-k and mean per-class recall."""
    if dataset.multilabel:
        return compute_multilabel_metrics(logits, dataset.labels)
    return compute_zeroshot_metrics(logits, dataset.labels)


def check_logits_and_labels(logits: np.ndarray, labels: np.ndarray) -> None:
    """Shapes must agree, labels index classes, and logits be finite (NaN would compare as a hit)."""
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"expected logits (N, C) and labels (N,) with N > 0, got {logits.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= logits.shape[1]:
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf")


def compute_label_ranks(logits: np.ndarray, labels: np.ndarray, block_size: int = ROW_BLOCK_SIZE) -> np.ndarray:
    """(N,) 0-based rank of the true class: other classes scoring >= it.

    Ties count against the true class, so a collapsed model that gives every class the same
    logit scores 0, not 100 %. Without ties this is the position in CLIP_benchmark's topk.
    """
    ranks = np.empty(len(labels), dtype=np.int64)
    for start in range(0, len(labels), block_size):
        block = logits[start : start + block_size]  # (B, C)
        true_logit = np.take_along_axis(block, labels[start : start + block_size, None], axis=1)  # (B, 1)
        ranks[start : start + block_size] = np.count_nonzero(block >= true_logit, axis=1) - 1  # minus itself
    return ranks


def compute_mean_per_class_recall(correct: np.ndarray, labels: np.ndarray) -> float:
    """Recall averaged over the classes present in `labels` (sklearn's balanced accuracy)."""
    support = np.bincount(labels)  # (C',) samples per class
    hits = np.bincount(labels, weights=correct.astype(np.float64), minlength=len(support))
    present = support > 0
    return float(np.mean(hits[present] / support[present]))


def compute_zeroshot_metrics(logits: np.ndarray, labels: np.ndarray, topk: Sequence[int] = TOPK) -> dict[str, float]:
    """{"top1", "top5", "mean_per_class_recall"} for (N, C) logits and (N,) integer labels.

    k is clipped to C, so top-5 on a 3-class set is 1.0 (CLIP_benchmark reports NaN there).
    """
    logits, labels = np.asarray(logits), np.asarray(labels).astype(np.int64)
    check_logits_and_labels(logits, labels)
    ranks = compute_label_ranks(logits, labels)
    n_classes = logits.shape[1]
    metrics = {TOPK_KEY.format(k=k): float(np.mean(ranks < min(k, n_classes))) for k in topk}
    metrics[MEAN_PER_CLASS_RECALL_KEY] = compute_mean_per_class_recall(ranks == 0, labels)
    return metrics


def compute_average_precision_per_class(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(C,) average precision of each class for (N, C) scores and 0/1 targets: the mean of
    precision@rank over the ranks of the positives (CLIP_benchmark's / torchnet's definition);
    a class without positives scores 0."""
    order = np.argsort(-scores, axis=0, kind="stable")  # (N, C) rows ranked per class
    truth = np.take_along_axis(targets.astype(np.float64), order, axis=0)  # (N, C)
    precision = np.cumsum(truth, axis=0) / np.arange(1, len(scores) + 1)[:, None]
    return (precision * truth).sum(axis=0) / np.maximum(truth.sum(axis=0), 1)


def compute_multilabel_metrics(logits: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """{"mean_average_precision"} for a multi-label set (VOC2007-multilabel): AP averaged over classes."""
    logits, targets = np.asarray(logits), np.asarray(targets)
    if logits.shape != targets.shape or logits.ndim != 2 or not np.isfinite(logits).all():
        raise ValueError(
            f"expected finite logits and 0/1 targets of one (N, C) shape, got {logits.shape} and {targets.shape}"
        )
    return {MEAN_AVERAGE_PRECISION_KEY: float(compute_average_precision_per_class(logits, targets).mean())}


ATTRIBUTE_ACCURACY_KEY = "attribute_accuracy"
GIVEN_KEY = "{other}_given_{attribute}"  # e.g. "shape_given_colour"


def compute_attribute_accuracy(
    predictions: np.ndarray, labels: np.ndarray, class_attributes: dict[str, Sequence[str]]
) -> dict[str, float | None]:
    """Accuracy per attribute of classes that combine attributes (e.g. "red circle" = colour red,
    shape circle), from (N,) top-1 predicted and (N,) true class indices.

    `class_attributes` maps each attribute name to its value per class. For image n the
    attribute a is right when class `predictions[n]` has the same value of a as class `labels[n]`:
    - `acc[a]` = fraction of images whose top-1 class has the right a;
    - `acc["b_given_a"]` (every ordered pair a != b) = among the images whose top-1 class has the
      right a, the fraction whose top-1 class also has the right b; None when no image has a right.
    With colour and shape, "shape_given_colour" asks whether the model tells shapes apart once it
    has the colour: chance is 1 / n_shapes when shape is guessed within the right colour.
    """
    predictions, labels = np.asarray(predictions, np.int64), np.asarray(labels, np.int64)
    right = {a: np.asarray(values)[predictions] == np.asarray(values)[labels] for a, values in class_attributes.items()}
    accuracy: dict[str, float | None] = {a: float(r.mean()) for a, r in right.items()}
    for a, given in right.items():
        for b, other in right.items():
            if b != a:
                accuracy[GIVEN_KEY.format(other=b, attribute=a)] = float(other[given].mean()) if given.any() else None
    return accuracy


def compute_confusion(predictions: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = top-1 predicted class."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
    return counts


def top1_predictions(logits: np.ndarray) -> np.ndarray:
    """(N,) index of each row's best class; a tie goes to the lowest index (numpy's argmax)."""
    return np.asarray(logits).argmax(axis=1)
