"""The shard format: tar + index round trips byte for byte, manifest entries describe the tar,
stats ride in the index, broken or tampered shards are refused, publishing is atomic."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest

from pipelines import shards, storage
from pipelines.captions import sample_key

CAPTION_SETS = [
    [{"text": "a red circle on a grey background", "source": "demo", "kind": "short"}],
    [
        {"text": "un café crème sur une table en bois", "source": "demo", "kind": "short"},
        {"text": "東京の夜景と赤い塔", "source": "demo", "kind": "short"},
        {"text": "a long caption " + "with many words " * 10, "source": "demo", "kind": "long"},
    ],
    [
        {"text": "emoji 🐱‍👤 and combining e\u0301 accents", "source": "demo", "kind": "long"},
        {"text": 'quote " backslash \\ tab-free', "source": "demo", "kind": "short"},
    ],
]


def make_sample(i: int, captions: list[dict]) -> dict:
    """A sample row with distinct binary payloads (all 256 byte values, NULs included)."""
    url = f"http://127.0.0.1/images/{i:06d}.jpg"
    meta = {
        "key": sample_key(url),
        "source": url,
        "captions": captions,
        "width": 32 + i,
        "height": 24 + 2 * i,
        "original_width": 320,
        "original_height": 240,
    }
    return {
        shards.KEY: sample_key(url),
        shards.IMAGE: b"\xff\xd8" + bytes(range(256)) * (i + 1) + b"\x00\xff\xd9",
        shards.EDGE: b"\x89PNG\r\n\x1a\n" + bytes([i]) * (100 + 37 * i),
        shards.META: json.dumps(meta, ensure_ascii=False, sort_keys=True),
    }


@pytest.fixture
def samples() -> list[dict]:
    return [make_sample(i, caps) for i, caps in enumerate(CAPTION_SETS)]


@pytest.fixture
def build(tmp_path):
    """(fs, build_path) of an empty local build folder."""
    return storage.open_storage(str(tmp_path / "corpus" / "build0"))


def test_write_then_read_round_trips_every_field_byte_for_byte(build, samples):
    fs, build_path = build
    entry = shards.write_shard(fs, build_path, 7, samples)
    read = shards.read_shard_samples(fs, build_path, entry, verify=True)
    expected = sorted(samples, key=lambda s: s[shards.KEY])
    assert [r[shards.KEY] for r in read] == [s[shards.KEY] for s in expected]
    for got, want in zip(read, expected):
        assert set(got) == set(shards.SAMPLE_COLUMNS)
        for column in shards.SAMPLE_COLUMNS:
            assert got[column] == want[column], column
    # Unicode captions survive the JSON member (written as UTF-8).
    texts = [c["text"] for r in read for c in shards.load_sample_meta(r)["captions"]]
    assert "東京の夜景と赤い塔" in texts and "emoji 🐱‍👤 and combining e\u0301 accents" in texts


def test_shard_tar_is_reproducible_whatever_the_input_order(samples):
    assert shards.encode_shard_tar(samples) == shards.encode_shard_tar(samples[::-1])


def test_manifest_entry_describes_the_published_tar(build, samples):
    fs, build_path = build
    entry = shards.write_shard(fs, build_path, 7, samples)
    tar_path, index_path = shards.shard_paths(build_path, 7)
    data = storage.read_bytes(fs, tar_path)
    assert entry == {
        "id": 7,
        "tar": "shards/000007.tar",
        "index": "index/000007.parquet",
        "n_samples": len(samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    assert storage.join(build_path, entry["tar"]) == tar_path
    assert storage.join(build_path, entry["index"]) == index_path


def test_index_has_one_row_per_sample_with_the_index_columns(build, samples):
    fs, build_path = build
    shards.write_shard(fs, build_path, 3, samples)
    _, index_path = shards.shard_paths(build_path, 3)
    rows = pq.read_table(index_path).to_pylist()
    assert len(rows) == len(samples)
    assert all(tuple(row) == shards.INDEX_COLUMNS for row in rows)
    by_key = {row["key"]: row for row in rows}
    assert len(by_key) == len(samples)
    for sample in samples:
        meta = json.loads(sample[shards.META])
        assert by_key[sample[shards.KEY]] == {
            "key": sample[shards.KEY],
            "shard": 3,
            "source": meta["source"],
            "n_captions": len(meta["captions"]),
            "n_long": sum(c["kind"] == shards.CAPTION_LONG for c in meta["captions"]),
            "width": meta["width"],
            "height": meta["height"],
            "image_bytes": len(sample[shards.IMAGE]),
            "edge_bytes": len(sample[shards.EDGE]),
            "captions": [c["text"] for c in meta["captions"]],
            shards.DIGEST: hashlib.sha256(sample[shards.IMAGE]).hexdigest(),
            "captions_json": json.dumps(meta["captions"], sort_keys=True),
        }


def test_shard_stats_ride_in_the_index_and_unpublished_shards_have_none(build, samples):
    fs, build_path = build
    stats = {"failures": {"http_404": 2, "decode_error": 1}, "n_groups": 6, "n_captions_written": 6}
    entry = shards.write_shard(fs, build_path, 0, samples, stats)
    assert shards.read_shard_stats(fs, build_path, 0) == {"shard": entry, **stats}
    assert shards.read_shard_stats(fs, build_path, 1) is None


def test_shard_with_no_samples_round_trips(build):
    """Every download of a shard can fail; its (empty) shard is still published."""
    fs, build_path = build
    entry = shards.write_shard(fs, build_path, 2, [], {"failures": {"http_404": 3}})
    assert entry["n_samples"] == 0
    assert shards.read_shard_samples(fs, build_path, entry, verify=True) == []
    assert shards.read_shard_stats(fs, build_path, 2)["failures"] == {"http_404": 3}


def test_index_folder_reads_as_one_table_with_an_empty_shard(build, samples):
    fs, build_path = build
    shards.write_shard(fs, build_path, 0, [])
    shards.write_shard(fs, build_path, 1, samples)
    table = pq.read_table(storage.join(build_path, shards.INDEX_DIR))
    assert table.num_rows == len(samples)


def tar_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("missing", shards.SAMPLE_EXTS)
def test_sample_missing_a_member_raises(missing):
    members = {
        "aaaa.jpg": b"img",
        "aaaa.edge.png": b"edge",
        "aaaa.json": b"{}",
        "bbbb.jpg": b"img",
        "bbbb.edge.png": b"edge",
        "bbbb.json": b"{}",
    }
    del members[f"aaaa.{missing}"]
    with pytest.raises(ValueError, match="aaaa"):
        list(shards.iter_tar_samples(tar_of(members)))


def test_last_sample_missing_a_member_raises():
    members = {"aaaa.jpg": b"img", "aaaa.edge.png": b"edge", "aaaa.json": b"{}", "bbbb.jpg": b"img", "bbbb.json": b"{}"}
    with pytest.raises(ValueError, match="bbbb"):
        list(shards.iter_tar_samples(tar_of(members)))


def test_verify_refuses_a_tampered_tar(build, samples):
    fs, build_path = build
    entry = shards.write_shard(fs, build_path, 5, samples)
    tar_path, _ = shards.shard_paths(build_path, 5)
    data = bytearray(storage.read_bytes(fs, tar_path))
    offset = bytes(data).index(bytes(range(256)))  # inside the first image payload
    data[offset] ^= 0xFF  # same size, still a valid tar
    with fs.open(tar_path, "wb") as f:
        f.write(bytes(data))
    assert len(shards.read_shard_samples(fs, build_path, entry)) == len(samples)
    with pytest.raises(ValueError, match="checksum"):
        shards.read_shard_samples(fs, build_path, entry, verify=True)


def test_write_bytes_atomic_leaves_no_temporaries(tmp_path):
    fs, folder = storage.open_storage(str(tmp_path / "out"))
    path = storage.join(folder, "sub", "file.bin")
    storage.write_bytes_atomic(fs, path, b"first")
    storage.write_bytes_atomic(fs, path, b"second")  # replaces the published file
    assert storage.read_bytes(fs, path) == b"second"
    assert [p.name for p in (tmp_path / "out" / "sub").iterdir()] == ["file.bin"]


def test_remove_stale_temporaries_deletes_only_leftovers(tmp_path):
    fs, folder = storage.open_storage(str(tmp_path))
    (tmp_path / "000001.tar").write_bytes(b"published")
    (tmp_path / f"000002.tar{storage.TMP_MARK}1a2b3c4d").write_bytes(b"partial")
    (tmp_path / f"000002.parquet{storage.TMP_MARK}deadbeef").write_bytes(b"partial")
    assert storage.remove_stale_temporaries(fs, folder) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001.tar"]
    assert storage.remove_stale_temporaries(fs, folder) == 0
    assert storage.remove_stale_temporaries(fs, storage.join(folder, "absent")) == 0


def test_manifest_digest_ignores_key_order_but_not_content():
    manifest = {
        "corpus": "demo",
        "build_id": "abc",
        "counts": {"written": 3, "failed": {"a": 1}},
        "shards": [{"id": 0, "sha256": "00"}, {"id": 1, "sha256": "11"}],
    }
    reordered = {
        "shards": [{"sha256": "00", "id": 0}, {"sha256": "11", "id": 1}],
        "counts": {"failed": {"a": 1}, "written": 3},
        "build_id": "abc",
        "corpus": "demo",
    }
    assert shards.manifest_digest(manifest) == shards.manifest_digest(reordered)
    changed = json.loads(json.dumps(manifest))
    changed["counts"]["written"] = 4
    assert shards.manifest_digest(changed) != shards.manifest_digest(manifest)
    # List order is content (shard order), not formatting.
    swapped = dict(manifest, shards=manifest["shards"][::-1])
    assert shards.manifest_digest(swapped) != shards.manifest_digest(manifest)


def test_manifest_written_and_read_back(tmp_path):
    fs, build_path = storage.open_storage(str(tmp_path / "b"))
    manifest = {"build_id": "xyz", "shards": [], "note": "naïve ✓"}
    shards.write_manifest(fs, build_path, manifest)
    assert shards.read_manifest(str(tmp_path / "b")) == manifest
    assert [p.name for p in (tmp_path / "b").iterdir()] == [shards.MANIFEST]


def test_the_txt_caption_is_the_fullest_short_one_else_the_first():
    def group(*captions):
        return {"captions": [{"text": t, "kind": k} for t, k in captions]}

    assert (
        shards.txt_caption(group(("a dog", "short"), ("a brown dog runs", "short"), ("a long story " * 20, "long")))
        == "a brown dog runs"
    )
    assert shards.txt_caption(group(("a cat sits", "short"), ("a dog runs", "short"))) == "a cat sits"
    assert shards.txt_caption(group(("first long", "long"), ("second long", "long"))) == "first long"
