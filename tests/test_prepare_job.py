"""prepare_cc12m.py through Ray Data on a loopback mirror: counts, reuse and resume."""

from __future__ import annotations

import json

import pytest

from pipelines import prepare_cc12m, shards, storage
from tests.conftest import PREPARE_ARGS as ARGS

pytestmark = pytest.mark.ray


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


def test_shards_fetched_in_parts_equal_shards_fetched_whole(built, tmp_path, monkeypatch, caplog):
    """The session's build fetched its last shards in parts (n_shards is no multiple of its
    CPUs); the same input fetched with every shard whole gives the same shards, byte for
    byte, and the same counts."""
    from pipelines import build, ray_setup

    _, tsv, _, build_uri = built
    manifest = shards.read_manifest(build_uri)
    n_split, _ = build.final_round_parts(len(manifest["shards"]), ray_setup.cluster_cpus())
    assert n_split, "the session build should have fetched some shards in parts"
    monkeypatch.setattr(build, "final_round_parts", lambda n_shards, n_cpus: (0, 1))
    with caplog.at_level("INFO", logger="pipelines.build"):
        whole_uri = prepare_cc12m.main(["--input", str(tsv), "--output", str(tmp_path), *ARGS])
    assert "in parts" not in caplog.text
    whole = shards.read_manifest(whole_uri)
    assert whole["shards"] == manifest["shards"] and whole["counts"] == manifest["counts"]


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


def test_a_job_over_a_slow_failing_mirror_counts_each_failure(small_corpus, ray_session, tmp_path):
    """The benchmark's mirror (bench_download.py): each image answered after 10-60 ms, some
    with 503, some with a reset connection, decided by the image's path alone, so the manifest
    must count exactly the failures the profile draws for the corpus's URLs."""
    from collections import Counter
    from urllib.parse import urlsplit

    from pipelines.demo_corpus import write_cc12m_tsv
    from pipelines.mirror import LoopbackMirror, ServingProfile

    corpus, _ = small_corpus
    profile = ServingProfile(latency_s=(0.01, 0.06), error_503=0.15, reset=0.1, seed=5)
    with LoopbackMirror(corpus.mirror_root, profile=profile) as mirror:
        tsv = write_cc12m_tsv(corpus, mirror.base_url, tmp_path / "slow.tsv", n_dead=0, n_corrupt=0)
        build_uri = prepare_cc12m.main(
            ["--input", str(tsv), "--output", str(tmp_path / "out"), *ARGS, "--retries", "0", "--shard-size", "24"]
        )
    paths = {urlsplit(line.split("\t", 1)[0]).path for line in tsv.read_text().splitlines()}
    drawn = Counter(profile.draw(p)[1] for p in paths)
    counts = shards.read_manifest(build_uri)["counts"]
    assert drawn["503"] and drawn["reset"]  # the seed exercises both failures
    assert counts["failed"] == {"http_503": drawn["503"], "connection_error": drawn["reset"]}
    assert counts["written"] == drawn["ok"] == corpus.n_images - drawn["503"] - drawn["reset"]
