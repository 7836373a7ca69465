"""The evaluation task registry (`TASKS`): what each kind of benchmark encodes and how it is
scored. A suite entry names a task and
its dataset(s); loading it gives a `Benchmark`; `requests` lists the images and texts to embed
(by role); `score` turns those embeddings into the report entry with the checkpoint's
topology (training/methods/topology/spaces.py): its similarity, template rule and modality gap."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from evaluation.datasets import load_sugarcrepe
from evaluation.datasets.landmarks import load_revisited
from evaluation.datasets.metric_learning import load_cub, load_sop
from evaluation.tasks.compositionality import compute_pair_accuracy, summarize_sugarcrepe
from evaluation.inversion import INVERTS, inversion_from_options, inversion_request
from evaluation.probe_views import views_from_options, views_request
from evaluation.tasks.intra_modal import (
    GAP_KEY,
    MAP_KEY,
    compute_modality_gap,
    compute_retrieval_metrics,
    compute_revisited_map,
    compute_text_to_text_metrics,
    split_first_caption,
)
from evaluation.tasks.linear_probe import LinearProbeConfig, evaluate_linear_probe
from scoring.sets import SET_READERS, TEMPLATED
from scoring.retrieval import compute_retrieval_recall, retrieval_scores, select_gallery
from scoring.zeroshot import (
    ATTRIBUTE_ACCURACY_KEY,
    class_logits,
    class_prompts,
    classification_metrics,
    compute_attribute_accuracy,
    compute_confusion,
    top1_predictions,
)

IMAGE = "image"
TEXT = "text"
IMAGE_STATES = "image_states"  # class-token states before the projection (linear probe, "features")
MODALITIES = (IMAGE, IMAGE_STATES, TEXT)
PROBE_FEATURES = {"embedding": IMAGE, "class_states": IMAGE_STATES}
READERS: dict[str, Callable] = {
    **SET_READERS,
    "sugarcrepe": load_sugarcrepe,
    "revisited": load_revisited,
    "cub": load_cub,
    "sop": load_sop,
}
# task -> (report section, dataset roles it reads)
TASKS = {
    "zeroshot": ("zeroshot", ("test",)),
    "retrieval": ("retrieval", ("test",)),
    "linear_probe": ("linear_probe", ("train", "test")),
    "compositionality": ("compositionality", ("test",)),
    "image_retrieval": ("intra_modal", ("train", "test")),
    "text_retrieval": ("intra_modal", ("test",)),
    "landmark_retrieval": ("intra_modal", ("test",)),  # revisited Oxford / Paris
}
Topology = object  # training/methods/topology/spaces.py Sphere and subclasses: score, class_scores, modality_gap
CONFUSION_KEY = "confusion"  # zero-shot entry: {"classnames", "counts" (true x predicted)[, "attributes"]}
CONFUSION_MAX_CLASSES = 100  # larger sets keep report.json small: no confusion counts
GALLERY_KEY = "gallery"  # retrieval entry: [{"image": uri or None, "caption", "top": [{"text", "correct", "score"}]}]


@dataclass(eq=False)
class Benchmark:
    name: str
    task: str
    data: dict[str, object]  # role ("test", "train") -> dataset
    options: dict = field(default_factory=dict)
    specs: dict = field(default_factory=dict)  # role -> the dataset spec it was read from

    @property
    def section(self) -> str:
        return TASKS[self.task][0]


def load_dataset(spec: dict, need_templates: bool):
    """A dataset from its spec: {"format": ..., "path": ..., other reader arguments}; a
    "protocol" key names the protocol of a retrieval set whose files do not say it."""
    spec = dict(spec)
    reader_name = spec.pop("format")
    path = spec.pop("path")
    protocol = spec.pop("protocol", None)
    if reader_name not in READERS:
        raise ValueError(f"unknown dataset format {reader_name!r}; known: {sorted(READERS)}")
    if reader_name in TEMPLATED:
        spec["need_templates"] = need_templates
    dataset = READERS[reader_name](path, **spec)
    return dataclasses.replace(dataset, protocol=protocol) if protocol else dataset


def load_benchmark(entry: dict) -> Benchmark:
    """Load the datasets of one suite entry: {"name", "task", "test": spec[, "train": spec][, "options"]}."""
    if entry.get("task") not in TASKS:
        raise ValueError(f"{entry.get('name')}: unknown task {entry.get('task')!r}; known: {sorted(TASKS)}")
    roles = benchmark_roles(entry["task"], entry.get("options", {}))
    missing = [role for role in roles if role not in entry]
    if missing:
        raise ValueError(f"{entry['name']}: task {entry['task']} needs dataset(s) {missing}")
    own_templates = entry["task"] == "zeroshot" and "templates" not in entry.get("options", {})
    data = {role: load_dataset(entry[role], need_templates=own_templates) for role in roles}
    if entry["task"] == "zeroshot" and "templates" in entry.get("options", {}):  # e.g. the paper's one per set
        data["test"] = dataclasses.replace(data["test"], templates=list(entry["options"]["templates"]))
    return Benchmark(entry["name"], entry["task"], data, entry.get("options", {}), {r: entry[r] for r in roles})


def benchmark_roles(task: str, options: dict) -> tuple[str, ...]:
    """The dataset roles an entry reads: its task's, except an image_retrieval entry whose
    gallery is its own test split (no train split then)."""
    if task == "image_retrieval" and options.get("gallery") == "test":
        return ("test",)
    return TASKS[task][1]


def unique_images(composition) -> list:
    return list(dict.fromkeys(ref for pairs in composition.subsets.values() for ref in pairs.images))


def composition_texts(composition) -> list[str]:
    return [t for pairs in composition.subsets.values() for t in (*pairs.positives, *pairs.negatives)]


def requests(bench: Benchmark) -> dict[str, tuple[str, list]]:
    """Role -> (modality, values to embed), in the order `score` expects them."""
    test = bench.data["test"]
    if bench.task == "zeroshot":  # a control of Cross the Gap: OTI images or OVI prompts
        return {
            "images": (side_modality(bench, IMAGE), test.images),
            "prompts": (side_modality(bench, TEXT), class_prompts(test)),
        }
    if bench.task == "retrieval":  # likewise with an inverted query side
        return {
            "images": (side_modality(bench, IMAGE), test.images),
            "captions": (side_modality(bench, TEXT), test.captions),
        }
    if bench.task == "text_retrieval":
        wanted = {"images": (IMAGE, test.images), "captions": (TEXT, test.captions)}
        if query_kind(bench, TEXT) != "native":  # each image's first caption, inverted
            first, _ = split_first_caption(test.text_to_image)
            wanted["queries"] = (query_modality(bench, TEXT), [test.captions[i] for i in first])
        return wanted
    if bench.task == "linear_probe":
        modality = probe_modality(bench)
        views = views_from_options(bench.options)
        train = modality if views is None else views_request(views)
        return {"train": (train, bench.data["train"].images), "test": (modality, test.images)}
    if bench.task == "image_retrieval":
        gallery = ("train", bench.data["train"]) if gallery_split(bench) == "train" else ("gallery", test)
        wanted = {gallery[0]: (IMAGE, gallery[1].images), "test": (query_modality(bench, IMAGE), test.images)}
        if mixture_weights(bench):  # the native queries too, to mix with the inverted ones
            wanted["test_native"] = (IMAGE, test.images)
        return wanted
    if bench.task == "landmark_retrieval":
        return {"gallery": (IMAGE, test.images), "test": (query_modality(bench, IMAGE), test.queries)}
    return {"images": (IMAGE, unique_images(test)), "texts": (TEXT, composition_texts(test))}


def query_kind(bench: Benchmark, modality: str) -> str:
    """An intra-modal entry's queries: "native", or the inversion that reads `modality`
    ("oti" for images, "ovi" for texts)."""
    kind = bench.options.get("query", "native")
    if kind != "native" and INVERTS.get(kind) != modality:
        known = ["native"] + [k for k, m in INVERTS.items() if m == modality]
        raise ValueError(f"{bench.name}: unknown {modality} query {kind!r}; known: {known}")
    return kind


def query_modality(bench: Benchmark, modality: str) -> str:
    """The embedding request of an intra-modal entry's queries: native, or an inversion request
    keyed by its settings."""
    kind = query_kind(bench, modality)
    return modality if kind == "native" else inversion_request(inversion_from_options(kind, bench.options))


def inverted_side(bench: Benchmark) -> str | None:
    """For zero-shot and image-text retrieval entries: the modality an inversion replaces
    (options {"query": "oti"}: the images, "ovi": the texts), None when native."""
    kind = bench.options.get("query", "native")
    if kind == "native":
        return None
    if kind not in INVERTS:
        raise ValueError(f"{bench.name}: unknown query {kind!r}; known: native, {', '.join(INVERTS)}")
    return INVERTS[kind]


def side_modality(bench: Benchmark, modality: str) -> str:
    """The embedding request of one side of a cross-modal entry: native, or inverted when the
    entry's query inverts that modality (the controls that must get worse)."""
    return modality if inverted_side(bench) != modality else query_modality(bench, modality)


def inverted_note(bench: Benchmark) -> dict:
    """{"query": "oti" | "ovi"} on an entry whose queries were inverted (the report pairs it
    with the native entry on the same data: evaluation/misalignment.py)."""
    kind = bench.options.get("query", "native")
    return {} if kind == "native" else {"query": kind}


def score_zeroshot(bench: Benchmark, features: dict, topology: Topology) -> dict:
    dataset = bench.data["test"]
    logits = class_logits(dataset, features["images"], features["prompts"], topology)
    entry = {**classification_metrics(dataset, logits), "n_images": dataset.n_images, "n_classes": dataset.n_classes}
    if dataset.multilabel:
        return entry
    entry.update(inverted_note(bench))
    predictions = top1_predictions(logits)
    if dataset.attributes:
        entry[ATTRIBUTE_ACCURACY_KEY] = compute_attribute_accuracy(predictions, dataset.labels, dataset.attributes)
    if dataset.n_classes <= CONFUSION_MAX_CLASSES:
        counts = compute_confusion(predictions, dataset.labels, dataset.n_classes)
        entry[CONFUSION_KEY] = {
            "classnames": list(dataset.classnames),
            "counts": counts.tolist(),
            **({"attributes": dataset.attributes} if dataset.attributes else {}),
        }
    return entry


def gallery_entries(dataset, scores: np.ndarray) -> list[dict]:
    """A few image queries with their best captions, for the report's retrieval gallery; an image
    held as bytes (a shard build's) is recorded as None, its caption still shown."""
    groups = dataset.caption_groups()
    return [
        {
            "image": dataset.images[image] if isinstance(dataset.images[image], str) else None,
            "caption": groups[image][0],
            "top": [{"text": dataset.captions[t], "correct": correct, "score": score} for t, score, correct in top],
        }
        for image, top in select_gallery(scores, dataset.text_to_image)
    ]


def score_retrieval(bench: Benchmark, features: dict, topology: Topology) -> dict:
    dataset = bench.data["test"]
    scores = retrieval_scores(features["images"], features["captions"], topology)
    metrics = compute_retrieval_recall(scores, dataset.text_to_image)
    return {
        **metrics,
        "protocol": dataset.protocol,
        "n_images": dataset.n_images,
        "n_texts": dataset.n_texts,
        GALLERY_KEY: gallery_entries(dataset, scores),
        **inverted_note(bench),
    }


def probe_modality(bench: Benchmark) -> str:
    """What a linear probe reads: the embedding (default) or, with options {"features":
    "class_states"}, the class-token state(s) before the projection (m of them concatenated)."""
    features = bench.options.get("features", "embedding")
    if features not in PROBE_FEATURES:
        raise ValueError(f"{bench.name}: unknown linear-probe features {features!r}; known: {sorted(PROBE_FEATURES)}")
    if "views" in bench.options and features != "class_states":
        raise ValueError(f'{bench.name}: augmented probe views are class-token states: set "features": "class_states"')
    return PROBE_FEATURES[features]


def score_linear_probe(bench: Benchmark, features: dict, topology: Topology) -> dict:
    train = bench.data["train"]
    test = bench.data["test"]
    options = {k: v for k, v in bench.options.items() if k not in ("features", "views")}
    config = LinearProbeConfig(**options)
    views = views_from_options(bench.options)
    train_features = features["train"]
    if views is not None:  # (N, V·D) -> (N, V, D): epoch e reads view e mod V
        train_features = train_features.reshape(len(train_features), views.views, -1)
    metrics = evaluate_linear_probe(
        train_features, train.labels, features["test"], test.labels, max(train.n_classes, test.n_classes), config
    )
    described = config.describe(bench.options.get("features", "embedding"))
    if views is not None:
        described += f"-{views.views}views-rrc{views.scale[0]}-{views.rand_augment}"
    return {
        **metrics,
        "protocol": described,
        "n_train": train.n_images,
        "n_test": test.n_images,
        "n_classes": test.n_classes,
    }


def paired_similarity(topology: Topology, a: np.ndarray, b: np.ndarray, block: int = 512) -> np.ndarray:
    """(N,) similarity of row i of `a` with row i of `b`, through the topology's similarity."""
    return np.concatenate(
        [np.diagonal(np.asarray(topology.score(a[s : s + block], b[s : s + block]))) for s in range(0, len(a), block)]
    )


def score_compositionality(bench: Benchmark, features: dict, topology: Topology) -> dict:
    composition = bench.data["test"]
    row_of = {ref: i for i, ref in enumerate(unique_images(composition))}
    texts = features["texts"]
    start = 0
    accuracies = {}
    for subset, pairs in composition.subsets.items():
        n = len(pairs.images)
        images = features["images"][[row_of[ref] for ref in pairs.images]]
        positives = texts[start : start + n]
        negatives = texts[start + n : start + 2 * n]
        start += 2 * n
        accuracies[subset] = compute_pair_accuracy(
            paired_similarity(topology, images, positives), paired_similarity(topology, images, negatives)
        )
    return {**summarize_sugarcrepe(accuracies), "protocol": composition.protocol, "n_images": composition.n_images}


def gallery_split(bench: Benchmark) -> str:
    """An image_retrieval entry's gallery: "train" (test queries against the train split, the
    paper's Pets/Cars/ImageNet protocol) or "test" (one split, each query removed from its
    own gallery: CUB, SOP)."""
    split = bench.options.get("gallery", "train")
    if split not in ("train", "test"):
        raise ValueError(f"{bench.name}: unknown gallery {split!r}; known: train, test")
    return split


def mixture_weights(bench: Benchmark) -> list[float]:
    """An inverted intra-modal entry's options {"mix": [α, ...]}: also score the queries
    q = normalise(α·x + (1 − α)·x_inv) (α = 1: native, α = 0: inverted; Cross the Gap's
    native/inverted mixture)."""
    weights = [float(a) for a in bench.options.get("mix", [])]
    if weights and bench.options.get("query", "native") == "native":
        raise ValueError(f'{bench.name}: a native/inverted mixture needs an inverted query ("query": "oti"/"ovi")')
    if any(not 0.0 <= a <= 1.0 for a in weights):
        raise ValueError(f"{bench.name}: mixture weights must lie in [0, 1], got {weights}")
    return weights


def mixed_queries(native: np.ndarray, inverted: np.ndarray, alpha: float) -> np.ndarray:
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    return unit(alpha * unit(np.asarray(native, np.float64)) + (1 - alpha) * unit(np.asarray(inverted, np.float64)))


def mixture_entry(bench: Benchmark, native: np.ndarray, inverted: np.ndarray, metrics_of) -> dict:
    """{"mAP_by_alpha": {α: mAP}} of the mixed queries (empty without "mix")."""
    weights = mixture_weights(bench)
    if not weights:
        return {}
    return {"mAP_by_alpha": {f"{a:g}": metrics_of(mixed_queries(native, inverted, a))[MAP_KEY] for a in weights}}


def score_image_retrieval(bench: Benchmark, features: dict, topology: Topology) -> dict:
    test = bench.data["test"]
    query = query_kind(bench, IMAGE)
    if gallery_split(bench) == "train":
        train = bench.data["train"]

        def metrics_of(queries):
            return compute_retrieval_metrics(queries, test.labels, features["train"], train.labels, topology.score)

        protocol = f"image->image, {query} test queries / train gallery"
        n_gallery = train.n_images
    else:
        ids = np.arange(test.n_images)

        def metrics_of(queries):
            return compute_retrieval_metrics(
                queries, test.labels, features["gallery"], test.labels, topology.score, query_ids=ids, gallery_ids=ids
            )

        protocol = f"image->image, {query} queries / same split, query removed"
        n_gallery = test.n_images - 1
    mixture = mixture_entry(bench, features.get("test_native"), features["test"], metrics_of)
    return {
        **metrics_of(features["test"]),
        **mixture,
        "protocol": protocol,
        "n_queries": test.n_images,
        "n_gallery": n_gallery,
        **inverted_note(bench),
    }


def score_text_retrieval(bench: Benchmark, features: dict, topology: Topology) -> dict:
    dataset = bench.data["test"]
    query = query_kind(bench, TEXT)

    def metrics_of(queries):
        return compute_text_to_text_metrics(features["captions"], dataset.text_to_image, topology.score, queries)

    first, _ = split_first_caption(dataset.text_to_image)
    mixture = mixture_entry(bench, features["captions"][first], features.get("queries"), metrics_of)
    gap = compute_modality_gap(features["images"], features["captions"], dataset.text_to_image, topology)
    return {
        **metrics_of(features.get("queries")),
        **mixture,
        GAP_KEY: gap,
        **inverted_note(bench),
        "protocol": f"text->text, {query} first-caption queries ({dataset.protocol})",
        "n_queries": dataset.n_images,
        "n_gallery": dataset.n_texts - dataset.n_images,
    }


def score_landmark_retrieval(bench: Benchmark, features: dict, topology: Topology) -> dict:
    """The revisited protocol; the entry's mAP is the medium setting's (the one usually quoted)."""
    dataset = bench.data["test"]
    query = query_kind(bench, IMAGE)
    maps = compute_revisited_map(features["test"], features["gallery"], dataset.ground_truth, topology.score)
    return {
        MAP_KEY: maps["medium"],
        **{f"{MAP_KEY}_{name}": value for name, value in maps.items()},
        "protocol": f"{dataset.protocol} {dataset.name}, {query} queries "
        f"(E/M/H {100 * maps['easy']:.1f} / {100 * maps['medium']:.1f} / {100 * maps['hard']:.1f})",
        "n_queries": len(dataset.queries),
        "n_gallery": dataset.n_images,
        **inverted_note(bench),
    }


TASK_SCORERS = {
    "zeroshot": score_zeroshot,
    "retrieval": score_retrieval,
    "linear_probe": score_linear_probe,
    "compositionality": score_compositionality,
    "image_retrieval": score_image_retrieval,
    "landmark_retrieval": score_landmark_retrieval,
    "text_retrieval": score_text_retrieval,
}


def score(bench: Benchmark, features: dict[str, np.ndarray], topology: Topology) -> dict:
    """The report entry of one benchmark from the embeddings of its `requests`."""
    return TASK_SCORERS[bench.task](bench, features, topology)
