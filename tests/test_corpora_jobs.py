"""The three prepare jobs on fixtures in their real layouts, through Ray Data on a loopback
mirror: data checks on the real output, every bad input counted by reason, content dedup,
the failure-rate abort, and a second run that neither downloads nor writes."""

from __future__ import annotations

import shutil

import pytest

from pipelines import build, prepare_cc12m, prepare_sharegpt4v, prepare_yfcc15m, storage
from pipelines.captions import sample_key
from pipelines.mirror import LoopbackMirror
from tests.bad_inputs import write_bad_corpus
from tests.build_checks import captions_by_source, check_build, tree_snapshot
from tests.corpus_fixtures import write_sharegpt4v_fixture, write_yfcc_fixture

pytestmark = pytest.mark.ray
COMMON = [
    "--allow-loopback-urls",
    "--image-size",
    "32",
    "--shard-size",
    "4",
    "--threads-per-task",
    "4",
    "--timeout",
    "1",
    "--retries",
    "0",
]


@pytest.fixture(scope="module")
def bad_corpus(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    with LoopbackMirror(root / "mirror") if (root / "mirror").mkdir() is None else None as mirror:
        corpus = write_bad_corpus(root / "mirror", mirror.base_url, root / "bad.tsv")
        shutil.copy(root / "mirror" / "plain.jpg", root / "mirror" / "copy.jpg")
        copy_url = f"{mirror.base_url}/copy.jpg"
        with corpus.tsv.open("a") as f:
            f.write(f"{copy_url}\tthe same picture behind another URL\n")
        out = root / "shards"
        uri = prepare_cc12m.main(["--input", str(corpus.tsv), "--output", str(out), *COMMON])
        yield corpus, mirror, out, uri, copy_url


def test_every_bad_input_is_counted_under_its_reason(bad_corpus):
    corpus, _, _, uri, copy_url = bad_corpus
    manifest, metas = check_build(uri)
    counts = manifest["counts"]
    assert counts["failed"] == dict(corpus.failed)
    assert counts["rows_rejected"] == dict(corpus.rejected)
    assert counts["header_rows"] == 1
    expected = dict(corpus.good)
    plain = copy_url.replace("copy.jpg", "plain.jpg")
    # Identical pictures: the smaller key stays and holds both groups' captions.
    kept, merged = sorted([plain, copy_url], key=sample_key)
    expected[kept] = expected.pop(plain) | {"the same picture behind another URL"}
    assert captions_by_source(metas) == expected
    assert counts["duplicates_merged"] == 1 and counts["downloaded"] == len(expected) + 1


def test_rotated_images_are_stored_upright(bad_corpus):
    corpus, _, _, uri, _ = bad_corpus
    _, metas = check_build(uri)
    (rotated,) = [m for m in metas.values() if m["source"] == corpus.rotated_url]
    assert (rotated["original_width"], rotated["original_height"]) == (64, 96)


def test_a_second_run_downloads_nothing_and_writes_nothing(bad_corpus):
    corpus, mirror, out, uri, _ = bad_corpus
    fs, path = storage.open_storage(str(out))
    before, served = tree_snapshot(fs, path), mirror.requests_served
    assert prepare_cc12m.main(["--input", str(corpus.tsv), "--output", str(out), *COMMON]) == uri
    assert mirror.requests_served == served
    assert tree_snapshot(fs, path) == before


def test_a_build_whose_input_is_mostly_wrong_aborts(bad_corpus, tmp_path):
    corpus = bad_corpus[0]
    args = prepare_cc12m.parse_args(
        ["--input", str(corpus.tsv), "--output", str(tmp_path), *COMMON, "--max-failure-rate", "0.1"]
    )
    with pytest.raises(build.BuildAborted, match="rows rejected"):
        prepare_cc12m.run(args)
    assert not list(tmp_path.rglob("manifest.json"))


@pytest.fixture(scope="module")
def yfcc(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("yfcc")
    (root / "mirror").mkdir()
    with LoopbackMirror(root / "mirror") as mirror:
        yield write_yfcc_fixture(root, mirror.base_url, n_photos=6, columns=25), root


def yfcc_expected_reasons(fx, from_metadata: bool) -> dict:
    reasons = dict(fx.expected_reasons)
    if from_metadata:
        reasons["malformed_row"] = reasons.get("malformed_row", 0) + fx.malformed_lines
        reasons["missing_metadata"] = 1  # the subset lists one id the metadata lacks
    return reasons


@pytest.mark.parametrize("layout", ["metadata", "csv", "parquet"])
def test_yfcc15m_from_each_input_layout(yfcc, layout):
    fx, root = yfcc
    inputs = {
        "metadata": ["--metadata", str(fx.metadata_tsv), "--subset", str(fx.subset_tsv)],
        "csv": ["--joined", str(fx.joined_csv)],
        "parquet": ["--joined", str(fx.joined_parquet)],
    }
    uri = prepare_yfcc15m.main([*inputs[layout], "--output", str(root / layout), *COMMON])
    manifest, metas = check_build(uri)
    assert captions_by_source(metas) == fx.expected_captions
    assert set(metas) == fx.expected_keys
    assert manifest["counts"]["rows_rejected"] == yfcc_expected_reasons(fx, layout == "metadata")
    assert manifest["counts"]["failed"] == {}


def test_sharegpt4v_validation_and_training_builds(ray_session, tmp_path):
    fx = write_sharegpt4v_fixture(tmp_path / "fixture", n_records=10)
    uris = prepare_sharegpt4v.main(
        [
            "--captions",
            str(fx.json_path),
            "--image-root",
            str(fx.image_root),
            "--coco-captions",
            str(fx.coco_captions_json),
            "--validation-records",
            "3",
            "--output",
            str(tmp_path / "out"),
            *COMMON,
        ]
    )
    n = len(fx.records)
    for split, indices in (("validation", range(3)), ("train", range(3, n))):
        manifest, metas = check_build(uris[split])
        assert captions_by_source(metas) == fx.expected_captions(indices), split
        assert manifest["counts"]["rows_rejected"] == dict(fx.expected_reasons(indices)), split
    assert uris["validation"].split("/")[-2] == "sharegpt4v-val3"
    long_kinds = {
        c["kind"] for m in check_build(uris["train"])[1].values() for c in m["captions"] if c["source"] == "sharegpt4v"
    }
    assert long_kinds == {"long"}
