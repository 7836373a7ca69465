"""prepare_cc12m.py through Ray Data on a loopback mirror: counts, reuse and resume."""
from __future__ import annotations

import json

import pytest

from pipelines import prepare_cc12m, shards, storage

pytestmark = pytest.mark.ray
from tests.conftest import PREPARE_ARGS as ARGS


@pytest.fixture(scope="module")
def built(small_build):
    return small_build


def read_all_samples(build_uri: str) -> list[dict]:
    manifest = shards.read_manifest(build_uri)
    fs, path = storage.open_storage(build_uri)
    return [s for e in manifest["shards"] for s in shards.read_shard_samples(fs, path, e, verify=True)]


def test_bad_rows_are_counted_and_everything_else_is_present(built):
    corpus, tsv, _, build_uri = built
    counts = shards.read_manifest(build_uri)["counts"]
    assert counts["failed"] == {"http_404": 1, "truncated_image": 1, "not_an_image": 1}
    assert counts["unique_sources"] == corpus.n_images + 3
    assert counts["written"] == counts["downloaded"] == corpus.n_images
    assert counts["rows_read"] == len(tsv.read_text().splitlines())
    samples = read_all_samples(build_uri)
    sources = {json.loads(s[shards.META])["source"].rsplit("/", 1)[1] for s in samples}
    assert sources == {f"{i:06d}.jpg" for i in range(corpus.n_images)}


def test_caption_groups_hold_every_caption_of_their_image(built):
    corpus, _, _, build_uri = built
    expected = {}
    for line in corpus.corpus_jsonl.read_text().splitlines():
        record = json.loads(line)
        expected[record["path"].rsplit("/", 1)[1]] = {*record["short_captions"], record["long_caption"]}
    for sample in read_all_samples(build_uri):
        meta = json.loads(sample[shards.META])
        assert {c["text"] for c in meta["captions"]} == expected[meta["source"].rsplit("/", 1)[1]]
        assert meta["width"] == meta["height"] == 32
    keys = [s[shards.KEY] for s in read_all_samples(build_uri)]
    assert len(keys) == len(set(keys))


def test_finished_build_is_reused(built, caplog):
    _, tsv, out, build_uri = built
    manifest_path = storage.join(build_uri, shards.MANIFEST)
    before = open(manifest_path).read()
    assert prepare_cc12m.main(["--input", str(tsv), "--output", str(out), *ARGS]) == build_uri
    assert open(manifest_path).read() == before


def test_interrupted_build_resumes_without_duplicates(built, tmp_path):
    _, tsv, _, build_uri = built
    complete = shards.read_manifest(build_uri)
    out = tmp_path / "resume"
    first = prepare_cc12m.main(["--input", str(tsv), "--output", str(out), *ARGS])
    fs, path = storage.open_storage(first)
    # Simulate a crash: the manifest and two shards' indexes were never published, and a
    # half-written temporary lies around.
    fs.rm(storage.join(path, shards.MANIFEST))
    for entry in complete["shards"][:2]:
        fs.rm(storage.join(path, entry["index"]))
    (out / "cc12m" / complete["build_id"] / "shards" / "000000.tar.tmp-deadbeef").write_bytes(b"partial")
    assert prepare_cc12m.main(["--input", str(tsv), "--output", str(out), *ARGS]) == first
    resumed = shards.read_manifest(first)
    assert resumed["counts"] == complete["counts"]
    assert [e["sha256"] for e in resumed["shards"]] == [e["sha256"] for e in complete["shards"]]
    assert not list((out / "cc12m" / complete["build_id"] / "shards").glob("*.tmp-*"))
