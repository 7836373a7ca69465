"""The evaluation job end to end on a micro checkpoint: a suite file with every task (zero-shot
on an image folder and a CLIP_benchmark WebDataset, retrieval, linear probe, SugarCrepe,
intra-modal retrieval), a missing dataset skipped with a clear line, the report and its
plots, and the embedding cache: a re-run encodes nothing, a changed dataset only itself."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import evaluate
from tests.eval_fixtures import (
    CLASSNAMES,
    TEMPLATES,
    class_image,
    save_micro_checkpoint,
    write_class_folder,
    write_karpathy,
)
from tests.test_eval_readers import write_sugarcrepe, write_wds

pytestmark = pytest.mark.ray


def write_suite(root: Path) -> Path:
    folder = {"format": "image_folder", "path": "{data}/shapes"}
    suite = {
        "name": "tiny",
        "roots": {"data": "/nonexistent"},
        "benchmarks": [
            {"name": "shapes", "task": "zeroshot", "test": {**folder, "split": "test"}, "groups": ["all"]},
            {
                "name": "wds_shapes",
                "task": "zeroshot",
                "test": {"format": "wds", "path": "{data}/wds_shapes"},
                "groups": ["all"],
            },
            {
                "name": "absent",
                "task": "zeroshot",
                "test": {"format": "wds", "path": "{data}/wds_absent"},
                "groups": ["all"],
            },
            {
                "name": "shapes",
                "task": "linear_probe",
                "train": {**folder, "split": "train"},
                "test": {**folder, "split": "test"},
                "options": {"epochs": 3},
            },
            {
                "name": "shapes",
                "task": "image_retrieval",
                "train": {**folder, "split": "train"},
                "test": {**folder, "split": "test"},
            },
            {
                "name": "tiny-karpathy",
                "task": "retrieval",
                "test": {"format": "karpathy", "path": "{data}/kp/dataset_tiny.json"},
            },
            {
                "name": "tiny-karpathy",
                "task": "text_retrieval",
                "test": {"format": "karpathy", "path": "{data}/kp/dataset_tiny.json"},
            },
            {
                "name": "sugarcrepe",
                "task": "compositionality",
                "test": {"format": "sugarcrepe", "path": "{data}/sugar_crepe"},
            },
        ],
    }
    path = root / "tiny_suite.json"
    path.write_text(json.dumps(suite))
    return path


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaljob")
    data = root / "data"
    write_class_folder(data / "shapes" / "test", n_per_class=3)
    write_class_folder(data / "shapes" / "train", n_per_class=4, offset=50)
    samples = [{"png": class_image(i % 6, 200 + i), "cls": str(i % 6).encode()} for i in range(12)]
    write_wds(data / "wds_shapes", "test", samples, per_shard=5, classnames=CLASSNAMES, templates=TEMPLATES)
    write_karpathy(data / "kp", n_images=8)
    write_sugarcrepe(data / "sugar_crepe")
    checkpoint = save_micro_checkpoint(root / "run" / "step_00000001")
    return {"root": root, "data": data, "suite": write_suite(root), "checkpoint": str(checkpoint.parent)}


def run_job(job_inputs, output: str, cache: Path) -> dict:
    return evaluate.main(
        [
            "--checkpoint",
            job_inputs["checkpoint"],
            "--suite",
            str(job_inputs["suite"]),
            "--root",
            f"data={job_inputs['data']}",
            "--output",
            output,
            "--cache",
            str(cache),
            "--batch-size",
            "16",
        ]
    )


def count_encoded(monkeypatch) -> list:
    calls = []
    real = evaluate.encode

    def counting(modality, blocks, cache, args):
        calls.append((modality, sum(map(len, blocks))))
        return real(modality, blocks, cache, args)

    monkeypatch.setattr(evaluate, "encode", counting)
    return calls


def test_suite_job_report_plots_and_cache(ray_session, job_inputs, monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    calls = count_encoded(monkeypatch)
    report = run_job(job_inputs, str(tmp_path / "first"), cache)
    # Images: 18 test + 24 train (shared by the probe and image retrieval) + 12 wds + 8 + 2 SugarCrepe.
    # Texts: 6 x 3 prompts (the same for both zero-shot sets: encoded once) + 24 captions + 7 x 2 x 2.
    assert sorted(calls) == [("image", 18 + 24 + 12 + 8 + 2), ("text", 6 * 3 + 24 + 7 * 2 * 2)]
    assert set(report["zeroshot"]) == {"shapes", "wds_shapes"}
    assert report["zeroshot"]["shapes"]["n_classes"] == 6 and report["zeroshot"]["wds_shapes"]["n_images"] == 12
    assert list(report["skipped"]) == ["zeroshot/absent"] and "nshards.txt" in report["skipped"]["zeroshot/absent"]
    assert report["averages"]["all"]["missing"] == ["absent"]
    assert report["averages"]["all"]["mean"] == pytest.approx(
        (report["zeroshot"]["shapes"]["top1"] + report["zeroshot"]["wds_shapes"]["top1"]) / 2
    )
    assert report["retrieval"]["tiny-karpathy"]["protocol"] == "karpathy-test"
    assert report["retrieval"]["tiny-karpathy"]["n_texts"] == 24
    assert 0 <= report["linear_probe"]["shapes"]["top1"] <= 1 and report["linear_probe"]["shapes"]["n_train"] == 24
    assert set(report["compositionality"]["sugarcrepe"]) >= {"replace_rel", "average_object", "average"}
    assert set(report["intra_modal"]) == {"shapes", "tiny-karpathy"}  # image->image, text->text + gap
    assert report["intra_modal"]["tiny-karpathy"]["modality_gap"] > 0
    assert report["checkpoint"]["topology"]["kind"] == "sphere" and report["checkpoint"]["fingerprint"]
    assert (
        report["datasets"]["linear_probe/shapes"]["digests"]["test"]
        == report["datasets"]["image_retrieval/shapes"]["digests"]["test"]
    )
    written = sorted(p.name for p in (tmp_path / "first").iterdir())
    pngs = [
        "plot_compositionality.png",
        "plot_confusion_shapes.png",
        "plot_confusion_wds_shapes.png",
        "plot_gallery_tiny-karpathy.png",
        "plot_intra_modal.png",
        "plot_linear_probe.png",
        "plot_retrieval.png",
        "plot_zeroshot.png",
    ]  # no training curves: the micro checkpoint's run logged no metrics.jsonl
    assert written == [*pngs, "report.json", "report.md"]
    markdown = (tmp_path / "first" / "report.md").read_text()
    assert all(f"]({name})" in markdown for name in pngs)
    assert (
        "## Compositionality (SugarCrepe accuracy)" in markdown and "- zeroshot/absent: FileNotFoundError" in markdown
    )

    calls.clear()  # a re-run encodes nothing and scores the same
    again = run_job(job_inputs, str(tmp_path / "second"), cache)
    assert calls == []
    for section in ("zeroshot", "retrieval", "linear_probe", "compositionality", "intra_modal"):
        assert again[section] == report[section], section

    extra = job_inputs["data"] / "wds_shapes"  # change one dataset: only its images are encoded
    samples = [{"png": class_image(i % 6, 300 + i), "cls": str(i % 6).encode()} for i in range(7)]
    for path in extra.glob("test/*"):
        path.unlink()
    (extra / "test").rmdir()
    write_wds(extra, "test", samples, per_shard=5)
    third = run_job(job_inputs, str(tmp_path / "third"), cache)
    assert calls == [("image", 7)]
    assert third["zeroshot"]["wds_shapes"]["n_images"] == 7
    assert third["zeroshot"]["shapes"] == report["zeroshot"]["shapes"]
    compare = tmp_path / "compare"
    from evaluation.plots import main as plots_main

    names = sorted(
        p.name
        for p in plots_main(
            [str(tmp_path / "first" / "report.json"), str(tmp_path / "third" / "report.json"), "--out", str(compare)]
        )
    )
    assert "compare_zeroshot.png" in names
    np.testing.assert_equal(
        json.loads((tmp_path / "first" / "report.json").read_text())["zeroshot"],
        json.loads(json.dumps(report["zeroshot"])),
    )


def test_a_checkpoint_written_during_evaluation_reaches_neither_report_nor_encoders(
    ray_session, job_inputs, monkeypatch, tmp_path
):
    """A live run checkpoints while its evaluation job runs: the driver resolved the run's latest
    checkpoint once, and the encoder actors embed with that one, not the newer one that appeared
    after (here: written while the driver loads the datasets, before any actor starts)."""
    from training import checkpoint
    from training.config import temperature_of
    from training.model import build_model
    from training.optim import build_optimizer, build_scheduler

    run = tmp_path / "run"
    save_micro_checkpoint(run / "step_00000001", seed=5)

    def write_newer(directory: Path) -> None:  # another model, saved as step 2 of the same run
        config = checkpoint.load_config(run / "step_00000001")
        torch.manual_seed(11)
        model = build_model(
            config.model, config.masking, temperature_of(config.loss, config.topology), topology=config.topology
        )
        optimizer = build_optimizer(model, config.optim)
        checkpoint.save_checkpoint(
            directory,
            model,
            optimizer,
            build_scheduler(optimizer, 1, 2),
            2,
            config,
            {"manifest_digest": "feed", "code_version": "test"},
        )

    def evaluate_run(target: Path, name: str) -> dict:
        return evaluate.main(
            [
                "--checkpoint",
                str(target),
                "--zeroshot",
                str(job_inputs["data"] / "shapes" / "test"),
                "--retrieval",
                f"kp={job_inputs['data'] / 'kp' / 'dataset_tiny.json'}",
                "--output",
                str(tmp_path / name),
                "--cache",
                "none",
                "--batch-size",
                "16",
            ]
        )

    real_load = evaluate.load_benchmarks
    monkeypatch.setattr(
        evaluate, "load_benchmarks", lambda *a, **k: (write_newer(run / "step_00000002"), real_load(*a, **k))[1]
    )
    live = evaluate_run(run, "live")
    monkeypatch.setattr(evaluate, "load_benchmarks", real_load)
    assert checkpoint.is_complete(run / "step_00000002")  # it was there before any encoding
    assert live["checkpoint"]["step"] == 1 and live["checkpoint"]["checkpoint_uri"].endswith("step_00000001")
    pinned, newer = evaluate_run(run / "step_00000001", "pinned"), evaluate_run(run / "step_00000002", "newer")
    assert newer["zeroshot"] != pinned["zeroshot"] or newer["retrieval"] != pinned["retrieval"]  # tells them apart
    assert live["zeroshot"] == pinned["zeroshot"] and live["retrieval"] == pinned["retrieval"]
