"""The revisited Oxford / Paris protocol (Radenović et al. 2018): its reader on a folder in the
published layout written here, its AP against the protocol's own loop, its easy / medium / hard
settings, and the entry through the scorer."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest

from evaluation.task_registry import Benchmark, requests, score
from evaluation.datasets.landmarks import load_revisited, read_ground_truth
from evaluation.tasks.intra_modal import compute_revisited_map, revisited_average_precision
from training.methods.topology.spaces import Sphere


def protocol_ap(ranks: np.ndarray, n_relevant: int) -> float:
    """revisitop's compute_ap, as published: 0-based ranks of the relevant items (junk removed)."""
    ap, recall_step = 0.0, 1.0 / n_relevant
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def protocol_positions(ranked: np.ndarray, relevant, junk) -> np.ndarray:
    """revisitop's compute_map: positions of the relevant items, each lowered by the junk above it."""
    pos = np.flatnonzero(np.isin(ranked, relevant))
    junk_pos = np.flatnonzero(np.isin(ranked, junk))
    return np.array([p - np.sum(junk_pos < p) for p in pos])


def test_hand_made_ranking():
    """Ranked a, junk, b, c with a and c relevant: junk leaves, ranks 0 and 2:
    ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2."""
    got = revisited_average_precision(np.array([0, 9, 1, 2]), np.array([0, 2]), np.array([9]))
    assert got == pytest.approx(((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)


def test_average_precision_matches_the_protocol_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        ranked = rng.permutation(40)
        relevant, junk = rng.choice(40, 6, replace=False)[:4], rng.choice(40, 6, replace=False)[4:]
        junk = np.setdiff1d(junk, relevant)
        want = protocol_ap(protocol_positions(ranked, relevant, junk), len(relevant))
        assert revisited_average_precision(ranked, relevant, junk) == pytest.approx(want)


def test_easy_medium_hard_settings():
    """Gallery 0..4 ranked in order for the one query; easy {0}, hard {3}, junk {1}."""
    truth = [{"easy": np.array([0]), "hard": np.array([3]), "junk": np.array([1])}]
    scores = lambda q, g: np.tile(-np.arange(g.shape[0], dtype=float), (len(q), 1))  # noqa: E731
    maps = compute_revisited_map(np.zeros((1, 2)), np.zeros((5, 2)), truth, scores)
    assert maps["easy"] == pytest.approx(1.0)  # hard and junk ignored: easy item first
    # medium: 0 and 3 relevant, junk leaves, ranks 0 and 2
    assert maps["medium"] == pytest.approx(((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2) / 2)
    # hard: 3 relevant, easy and junk leave (2, 3, 4 remain), rank 1: (0/1 + 1/2) / 2
    assert maps["hard"] == pytest.approx(0.25)


def write_revisited(root, tampered: bool = False):
    (root / "jpg").mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f"img_{i}" for i in range(6)]
    for n in names:
        cv2.imwrite(str(root / "jpg" / f"{n}.jpg"), rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    gnd = [
        {"bbx": [5.2, 4.0, 24.0, 19.0], "easy": np.array([1, 2]), "hard": np.array([3]), "junk": np.array([4])},
        {"bbx": [0.0, 0.0, 59.0, 39.0], "easy": [], "hard": np.array([5]), "junk": []},
    ]
    truth = {"imlist": names, "qimlist": ["img_0", "img_5"], "gnd": gnd}
    data = pickle.dumps(truth)
    if tampered:

        class Evil:
            def __reduce__(self):
                import os

                return (os.system, ("true",))

        data = pickle.dumps({**truth, "x": Evil()})
    (root / "gnd_roxford5k.pkl").write_bytes(data)
    return truth


def test_reader_crops_queries_and_reads_the_ground_truth(tmp_path):
    write_revisited(tmp_path)
    (tmp_path / "distractors").mkdir()
    cv2.imwrite(str(tmp_path / "distractors" / "d0.jpg"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "distractors" / "list.txt").write_text("d0.jpg\n")
    data = load_revisited(str(tmp_path), distractors=str(tmp_path / "distractors" / "list.txt"))
    assert data.name == "roxford5k" and data.n_images == 7 and data.images[-1].endswith("d0.jpg")
    crop = cv2.imdecode(np.frombuffer(data.queries[0], np.uint8), cv2.IMREAD_COLOR)
    assert crop.shape[:2] == (16, 20)  # rows 4..19, columns 5..24 of the query image
    np.testing.assert_array_equal(data.ground_truth[0]["hard"], [3])
    assert data.ground_truth[1]["easy"].dtype == np.int64 and data.protocol == "revisited + distractors"


def test_reader_refuses_a_pickle_that_would_run_code(tmp_path):
    write_revisited(tmp_path, tampered=True)
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        load_revisited(str(tmp_path))
    assert read_ground_truth(pickle.dumps({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]


def test_landmark_entry_through_the_scorer(tmp_path):
    write_revisited(tmp_path)
    data = load_revisited(str(tmp_path))
    bench = Benchmark("roxford5k", "landmark_retrieval", {"test": data}, {})
    wanted = requests(bench)
    assert wanted["gallery"] == ("image", data.images) and wanted["test"] == ("image", data.queries)
    rng = np.random.default_rng(2)
    features = {"test": rng.normal(size=(2, 8)), "gallery": rng.normal(size=(6, 8))}
    entry = score(bench, features, Sphere(8))
    want = compute_revisited_map(features["test"], features["gallery"], data.ground_truth, Sphere(8).score)
    assert entry["mAP"] == pytest.approx(want["medium"]) and entry["mAP_hard"] == pytest.approx(want["hard"])
    assert "revisited roxford5k, native queries" in entry["protocol"]
