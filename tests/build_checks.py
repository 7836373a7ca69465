"""Data checks every prepared build must pass, on its real output."""

from __future__ import annotations

import io
import json
import tarfile

import cv2
import numpy as np
import pyarrow.parquet as pq

from pipelines import shards, storage
from pipelines.edges import decode_edge_png, edge_map_shape


def read_build(build_uri: str) -> tuple[dict, list[dict]]:
    """(manifest, every sample row), tars verified against the manifest's checksums."""
    manifest = shards.read_manifest(build_uri)
    fs, path = storage.open_storage(build_uri)
    samples = [s for e in manifest["shards"] for s in shards.read_shard_samples(fs, path, e, verify=True)]
    return manifest, samples


def check_build(build_uri: str) -> tuple[dict, dict[str, dict]]:
    """Schema, unique keys, decodable upright RGB images with edge maps of the documented
    geometry, at least one caption each, counts that add up; returns (manifest, meta by key)."""
    manifest, samples = read_build(build_uri)
    fs, path = storage.open_storage(build_uri)
    keys = [s[shards.KEY] for s in samples]
    assert len(keys) == len(set(keys)), "duplicate keys"
    index_keys = []
    for entry in manifest["shards"]:
        with fs.open(storage.join(path, entry["index"]), "rb") as f:
            table = pq.read_table(f)
        assert table.schema.names == list(shards.INDEX_COLUMNS)
        index_keys += table.column("key").to_pylist()
    assert sorted(index_keys) == sorted(keys)
    metas = {}
    for sample in samples:
        image = cv2.imdecode(np.frombuffer(sample[shards.IMAGE], np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
        edge = decode_edge_png(sample[shards.EDGE])
        assert edge.shape == edge_map_shape(*image.shape[:2])
        meta = json.loads(sample[shards.META])
        assert meta["captions"] and all(c["text"].strip() for c in meta["captions"])
        assert (meta["height"], meta["width"]) == image.shape[:2]
        metas[sample[shards.KEY]] = meta
    counts = manifest["counts"]
    assert counts["written"] == len(samples) == sum(e["n_samples"] for e in manifest["shards"])
    assert counts["unique_sources"] == (
        counts["written"] + counts["duplicates_merged"] + sum(counts["failed"].values())
    )
    assert counts["captions_written"] == sum(len(m["captions"]) for m in metas.values())
    assert not fs.exists(storage.join(path, "staging"))
    check_open_clip_layout(fs, path, manifest, metas)
    return manifest, metas


def check_open_clip_layout(fs, path: str, manifest: dict, metas: dict[str, dict]) -> None:
    """What OpenCLIP's WebDataset loader needs: tars 000000.tar... without a gap, a
    shards/sizes.json that agrees with the manifest, and a `<key>.txt` beside every sample, the
    caption `txt_caption` chooses."""
    ids = [e["id"] for e in manifest["shards"]]
    assert ids == list(range(len(ids))), ids
    assert [e["tar"] for e in manifest["shards"]] == [f"shards/{i:06d}.tar" for i in ids]
    sizes = json.loads(storage.read_bytes(fs, storage.join(path, shards.SHARDS_DIR, shards.SIZES_FILE)))
    assert sizes == {f"{e['id']:06d}.tar": e["n_samples"] for e in manifest["shards"]}
    texts = {}
    for entry in manifest["shards"]:
        data = storage.read_bytes(fs, storage.join(path, entry["tar"]))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == shards.EXT_TEXT:
                    texts[key] = tar.extractfile(member).read().decode("utf-8")
    assert texts == {key: shards.txt_caption(meta) for key, meta in metas.items()}


def captions_by_source(metas: dict[str, dict]) -> dict[str, set[str]]:
    return {m["source"]: {c["text"] for c in m["captions"]} for m in metas.values()}


def tree_snapshot(fs, path: str) -> dict[str, tuple]:
    """Every file under path with its size and modification time."""
    return {
        p: (info["size"], info.get("mtime") or info.get("LastModified"))
        for p, info in fs.find(path, detail=True).items()
    }
