"""Named suites: every shipped suite parses, names known tasks and formats, resolves its roots
(overridable from the command line), and reproduces its paper's list of benchmarks."""

from __future__ import annotations

import json

import pytest

from evaluation import evaluate, suites
from evaluation.task_registry import READERS, TASKS, benchmark_roles, load_benchmark


@pytest.mark.parametrize("name", suites.available_suites())
def test_shipped_suites_are_well_formed(name):
    entries = suites.suite_entries(name, {})
    assert entries, name
    for entry in entries:
        assert entry["task"] in TASKS, entry
        for role in benchmark_roles(entry["task"], entry.get("options", {})):
            assert entry[role]["format"] in READERS, entry
            assert not any("{" in str(v) for v in entry[role].values()), entry  # every root resolved
    keys = [(TASKS[e["task"]][0], e["name"]) for e in entries]  # one report entry per section and name
    assert len(keys) == len(set(keys)), f"{name}: duplicate benchmark names"


def test_pgs_suite_is_the_papers_list():
    entries = suites.suite_entries("pgs")
    groups = lambda g: [e["name"] for e in entries if g in e.get("groups", [])]  # noqa: E731
    assert len(groups("zeroshot17")) == 17 and len(groups("robustness")) == 6
    assert {e["name"] for e in entries if e["task"] == "retrieval"} == {"mscoco", "flickr8k", "flickr30k"}
    probes = [e for e in entries if e["task"] == "linear_probe"]
    assert {e["name"] for e in probes} == {"cifar10", "cifar100", "imagenet1k"}
    assert all(
        e["options"] == {"epochs": 10, "lr": 0.1, "batch_size": 64} and e["train"]["split"] == "train" for e in probes
    )
    assert [e["task"] for e in entries].count("compositionality") == 1


def test_smartclip_suite_protocols():
    entries = {e["name"]: e for e in suites.suite_entries("smartclip")}
    assert entries["flickr30k-full"]["test"]["format"] == "flickr_token"
    assert entries["coco-val2017"]["test"]["format"] == "coco_captions"
    assert entries["sharegpt4v-1k"]["test"] == {"format": "long_build", "path": "/data/sharegpt4v/val1k", "limit": 1000}
    assert len([e for e in entries.values() if e["task"] == "zeroshot"]) == 9


def test_roots_are_overridden_and_unknown_roots_named(tmp_path):
    entries = suites.suite_entries("pgs", {"clip_benchmark": "s3://bucket/cb/"})
    assert entries[0]["test"]["path"] == "s3://bucket/cb/wds_food101"
    suite = tmp_path / "mine.json"
    suite.write_text(
        json.dumps(
            {
                "name": "mine",
                "benchmarks": [{"name": "x", "task": "zeroshot", "test": {"format": "wds", "path": "{nowhere}/x"}}],
            }
        )
    )
    with pytest.raises(ValueError, match="--root nowhere="):
        suites.suite_entries(str(suite))
    with pytest.raises(FileNotFoundError, match="pgs"):
        suites.read_suite("no-such-suite")


def test_bad_entries_are_clear_errors():
    with pytest.raises(ValueError, match="unknown task"):
        load_benchmark({"name": "x", "task": "zero-shot", "test": {}})
    with pytest.raises(ValueError, match=r"needs dataset\(s\) \['train'\]"):
        load_benchmark({"name": "x", "task": "linear_probe", "test": {"format": "wds", "path": "/x"}})
    with pytest.raises(ValueError, match="unknown dataset format"):
        load_benchmark({"name": "x", "task": "zeroshot", "test": {"format": "tfds", "path": "/x"}})


def test_missing_data_is_skipped_not_fatal(tmp_path):
    skipped = {}
    entries = suites.suite_entries(
        "smartclip",
        {
            "sharegpt4v": str(tmp_path / "none"),
            "urban1k": str(tmp_path),
            "coco": str(tmp_path),
            "flickr30k": str(tmp_path),
            "clip_benchmark": str(tmp_path),
        },
    )
    assert evaluate.load_benchmarks(entries, skipped) == []
    assert len(skipped) == len(entries)
    assert "missing" in skipped["retrieval/urban1k"] and "FileNotFoundError" in skipped["zeroshot/gtsrb"]


def test_command_line_entries(tmp_path):
    args = evaluate.parse_args(
        [
            "--checkpoint",
            "c",
            "--output",
            "o",
            "--suite",
            "pgs",
            "--only",
            "cifar10",
            "--root",
            "clip_benchmark=/cb",
            "--zeroshot",
            f"mine={tmp_path}",
            "--long-retrieval",
            str(tmp_path / "Urban1k"),
        ]
    )
    entries = evaluate.collect_entries(args)
    assert [(e["task"], e["name"]) for e in entries] == [
        ("zeroshot", "cifar10"),
        ("linear_probe", "cifar10"),
        ("zeroshot", "mine"),
        ("retrieval", "Urban1k"),
    ]
    assert entries[0]["test"]["path"] == "/cb/wds_cifar10"
    assert entries[2]["test"]["format"] == "image_folder" and entries[3]["test"]["format"] == "long_folder"


def test_spec_protocol_names_a_wds_retrieval_protocol(tmp_path):
    from tests.test_eval_readers import write_wds

    root = write_wds(
        tmp_path / "wds_flickr8k", "test", [{"txt": b"a dog", "png": b"x"}], per_shard=1, dataset_type="retrieval"
    )
    bench = load_benchmark(
        {
            "name": "f8k",
            "task": "retrieval",
            "test": {"format": "wds", "path": str(root), "protocol": "karpathy-test-1k"},
        }
    )
    assert bench.data["test"].protocol == "karpathy-test-1k"
    assert suites.suite_entries("pgs")[23]["test"]["protocol"] == "karpathy-test-5k (clip_benchmark wds)"


def test_duplicate_names_in_one_section_are_refused(tmp_path):
    args = evaluate.parse_args(
        ["--checkpoint", "c", "--output", "o", "--zeroshot", f"x={tmp_path}", f"x={tmp_path / 'other'}"]
    )
    with pytest.raises(ValueError, match="two benchmarks named 'x'"):
        evaluate.collect_entries(args)


def test_crossgap_controls_keep_their_templates_and_invert_one_side():
    """The zero-shot controls name CoOp's one template per set ({c} is not a data root), and
    each has a native, an OTI and an OVI entry."""
    from evaluation.suites import suite_entries

    entries = {e["name"]: e for e in suite_entries("crossgap")}
    assert entries["pets-zeroshot"]["options"] == {"templates": ["a photo of a {c}, a type of pet."]}
    assert entries["pets-zeroshot-oti"]["options"]["query"] == "oti"
    assert entries["pets-zeroshot-ovi"]["options"]["query"] == "ovi"
    assert entries["pets-zeroshot"]["test"]["path"] == "/data/clip_benchmark/wds_vtab-pets"  # specs resolved
    assert entries["mscoco-karpathy-i2t-t2i-oti"]["task"] == "retrieval"
