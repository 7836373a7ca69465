"""The shard format: sample fields, WebDataset tar shards, Parquet index and manifest.

A build lives under `<root>/<corpus>/<build-id>/` with `shards/NNNNNN.tar` (numbered from
000000 without gaps, so a brace range `{000000..NNNNNN}` names them all), `shards/sizes.json`,
`index/NNNNNN.parquet` and `manifest.json` (written last: it marks the build complete).
Training and evaluation read shards only through this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

# Members of one sample inside a tar (WebDataset: `<key>.<ext>`).
EXT_IMAGE = "jpg"
EXT_EDGE = "edge.png"
EXT_META = "json"
SAMPLE_EXTS = (EXT_IMAGE, EXT_EDGE, EXT_META)
# One caption of the group as plain text, for readers that take one caption per image
# (OpenCLIP's `rename(image="jpg;...", text="txt")`); derived from the JSON group (`txt_caption`),
# so our own reader ignores it.
EXT_TEXT = "txt"
SIZES_FILE = "sizes.json"  # shards/sizes.json: {"000000.tar": n, ...}, OpenCLIP's dataset size

# Columns of a decoded sample row (the form shards take in Ray Data and in tests).
KEY = "key"
IMAGE = "jpg"
EDGE = "edge_png"
META = "meta_json"
SAMPLE_COLUMNS = (KEY, IMAGE, EDGE, META)

# Caption kinds inside a caption-multiplicity group.
CAPTION_SHORT = "short"
CAPTION_LONG = "long"

MANIFEST = "manifest.json"
SHARD_STATS_KEY = "clipforge.shard_stats"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
DIGEST = "content_digest"  # sha256 of the stored JPEG: identical pictures, identical digests
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int64()),
        ("source", pa.string()),
        ("n_captions", pa.int64()),
        ("n_long", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("image_bytes", pa.int64()),
        ("edge_bytes", pa.int64()),
        ("captions", pa.list_(pa.string())),
        (DIGEST, pa.string()),
        ("captions_json", pa.string()),
    ]
)  # the caption group with kinds and origins
INDEX_COLUMNS = tuple(INDEX_SCHEMA.names)


def shard_name(shard_id: int) -> str:
    return f"{shard_id:06d}"


def shard_paths(build_path: str, shard_id: int) -> tuple[str, str]:
    """Tar and index paths of one shard inside a build."""
    name = shard_name(shard_id)
    return (storage.join(build_path, SHARDS_DIR, f"{name}.tar"), storage.join(build_path, INDEX_DIR, f"{name}.parquet"))


def txt_caption(meta: dict) -> str:
    """The one caption a single-caption reader gets: the group's short caption with the most
    words (the fullest alt-text: CC12M's only one, YFCC15M's title or description, the fullest
    of COCO's five for ShareGPT4V), ties broken by the group's (text) order; a group of long
    captions only gives its first. The JSON group keeps every caption."""
    captions = meta["captions"]
    short = [c["text"] for c in captions if c["kind"] == CAPTION_SHORT]
    if not short:
        return captions[0]["text"]
    return max(short, key=lambda text: len(text.split()))  # max keeps the first of equals


def encode_shard_tar(samples: Iterable[dict]) -> bytes:
    """A WebDataset tar of sample rows (members sorted by key, fixed mtime: reproducible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for row in sorted(samples, key=lambda r: r[KEY]):
            members = {
                EXT_IMAGE: row[IMAGE],
                EXT_EDGE: row[EDGE],
                EXT_META: row[META].encode("utf-8"),
                EXT_TEXT: txt_caption(json.loads(row[META])).encode("utf-8"),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{row[KEY]}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def iter_tar_samples(data: bytes) -> Iterator[dict]:
    """Sample rows of a shard tar, in stored order; incomplete samples raise."""
    current: dict = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, ext = member.name.split(".", 1)
            if current and current[KEY] != key:
                yield _finish_sample(current)
                current = {}
            current[KEY] = key
            current[ext] = tar.extractfile(member).read()
    if current:
        yield _finish_sample(current)


def _finish_sample(members: dict) -> dict:
    missing = [ext for ext in SAMPLE_EXTS if ext not in members]
    if missing:
        raise ValueError(f"sample {members[KEY]} lacks {missing} in its shard")
    return {
        KEY: members[KEY],
        IMAGE: members[EXT_IMAGE],
        EDGE: members[EXT_EDGE],
        META: members[EXT_META].decode("utf-8"),
    }


def build_index_table(samples: list[dict], shard_id: int) -> pa.Table:
    """One row per sample: what statistics and samplers need without opening tars."""
    metas = [json.loads(s[META]) for s in samples]
    columns = {
        "key": [s[KEY] for s in samples],
        "shard": [shard_id] * len(samples),
        "source": [m["source"] for m in metas],
        "n_captions": [len(m["captions"]) for m in metas],
        "n_long": [sum(c["kind"] == CAPTION_LONG for c in m["captions"]) for m in metas],
        "width": [m["width"] for m in metas],
        "height": [m["height"] for m in metas],
        "image_bytes": [len(s[IMAGE]) for s in samples],
        "edge_bytes": [len(s[EDGE]) for s in samples],
        "captions": [[c["text"] for c in m["captions"]] for m in metas],
        DIGEST: [hashlib.sha256(s[IMAGE]).hexdigest() for s in samples],
        "captions_json": [json.dumps(m["captions"], sort_keys=True) for m in metas],
    }
    return pa.table(columns, schema=INDEX_SCHEMA)  # explicit: an empty shard keeps the types


def write_shard(fs, build_path: str, shard_id: int, samples: list[dict], stats: dict | None = None) -> dict:
    """Publish one shard (tar, then index) atomically; returns its manifest entry.

    `stats` (failures by reason, ...) ride in the index's Parquet metadata, so a resumed
    build recovers them from exactly the shards that were published.
    """
    tar_path, index_path = shard_paths(build_path, shard_id)
    tar_bytes = encode_shard_tar(samples)
    storage.write_bytes_atomic(fs, tar_path, tar_bytes)
    entry = shard_entry(shard_id, len(samples), tar_bytes)
    table = build_index_table(samples, shard_id)
    payload = json.dumps({"shard": entry, **(stats or {})}, sort_keys=True)
    table = table.replace_schema_metadata({SHARD_STATS_KEY: payload})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    # The index is published last: a shard counts as done only when its index exists.
    storage.write_bytes_atomic(fs, index_path, sink.getvalue())
    return entry


def read_shard_stats(fs, build_path: str, shard_id: int) -> dict | None:
    """The stats a published shard carries, or None if the shard is not published."""
    _, index_path = shard_paths(build_path, shard_id)
    if not fs.exists(index_path):
        return None
    with fs.open(index_path, "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    return json.loads(metadata[SHARD_STATS_KEY.encode()])


def shard_entry(shard_id: int, n_samples: int, tar_bytes: bytes) -> dict:
    name = shard_name(shard_id)
    return {
        "id": shard_id,
        "tar": f"{SHARDS_DIR}/{name}.tar",
        "index": f"{INDEX_DIR}/{name}.parquet",
        "n_samples": n_samples,
        "bytes": len(tar_bytes),
        "sha256": hashlib.sha256(tar_bytes).hexdigest(),
    }


def read_shard_samples(fs, build_path: str, entry: dict, *, verify: bool = False) -> list[dict]:
    """All sample rows of one shard named by its manifest entry."""
    data = storage.read_bytes(fs, storage.join(build_path, entry["tar"]))
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"checksum mismatch for {entry['tar']} in {build_path}")
    return list(iter_tar_samples(data))


def verify_shard_tar(fs, tar_path: str, entry: dict) -> None:
    """Raise unless the tar at `tar_path` has the checksum its manifest entry records
    (streamed: a shard is never read whole for this)."""
    if storage.sha256_of(fs, tar_path) != entry["sha256"]:
        raise ValueError(f"checksum mismatch for {tar_path}")


def write_sizes(fs, build_path: str, entries: list[dict]) -> None:
    """shards/sizes.json, as OpenCLIP's WebDataset loader reads a dataset's size."""
    sizes = {entry["tar"].rsplit("/", 1)[-1]: entry["n_samples"] for entry in entries}
    data = json.dumps(sizes, indent=1, sort_keys=True).encode("utf-8")
    storage.write_bytes_atomic(fs, storage.join(build_path, SHARDS_DIR, SIZES_FILE), data)


def write_manifest(fs, build_path: str, manifest: dict) -> None:
    """Written last: its presence marks the build complete."""
    data = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    storage.write_bytes_atomic(fs, storage.join(build_path, MANIFEST), data)


def read_manifest(build_uri: str) -> dict:
    fs, path = storage.open_storage(build_uri)
    return json.loads(storage.read_bytes(fs, storage.join(path, MANIFEST)))


def manifest_digest(manifest: dict) -> str:
    """Digest of a manifest's canonical JSON: what training and evaluation record."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_sample_meta(row: dict) -> dict:
    return json.loads(row[META])
