"""The CPU stages without Ray: download through img2dataset from a loopback mirror, resize once,
classify failures, and build one shard end to end. Only 127.0.0.1 is ever contacted."""

from __future__ import annotations

import io
import json
import socket
import time

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import shards, storage
from pipelines.captions import sample_key
from pipelines.edges import decode_edge_png, edge_map_shape
from tests.test_edges_transforms import assert_edges_of
from pipelines.mirror import LoopbackMirror
from tests.conftest import S3_BUCKET
from pipelines.image_input import is_truncated_jpeg
from pipelines.stages import DownloadParams, ImageFetcher, ShardBuilder, classify_download_error, classify_resize_error

IMAGE_SIZE = 32
PARAMS = DownloadParams(
    image_size=IMAGE_SIZE, min_image_size=0, allow_loopback=True, timeout_s=5.0, retries=0, thread_count=4
)
# (width, height) of the good images: landscape, portrait, square, smaller than IMAGE_SIZE.
GOOD_SIZES = {"wide.jpg": (96, 64), "tall.jpg": (48, 80), "square.jpg": (40, 40), "small.jpg": (20, 30)}
# Bad files and the reason each must be counted under.
BAD_FILES = {"truncated.jpg": "truncated_image", "text.jpg": "not_an_image", "empty.jpg": "empty_file"}


def encode_jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mirror(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    for seed, (name, (width, height)) in enumerate(GOOD_SIZES.items()):
        (root / name).write_bytes(encode_jpeg(width, height, seed))
    jpeg = encode_jpeg(96, 96, 99)
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])  # past the header, mid-scan
    (root / "text.jpg").write_bytes(b"this is not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    with LoopbackMirror(root) as server:
        yield server


@pytest.fixture(scope="module")
def fetch() -> ImageFetcher:
    return ImageFetcher(PARAMS)


def closed_loopback_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("name", list(GOOD_SIZES))
def test_good_image_is_resized_to_the_image_size(mirror, fetch, name):
    image, reason = fetch("k", f"{mirror.base_url}/{name}")
    assert reason == ""
    width, height = GOOD_SIZES[name]
    assert (image["width"], image["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert (image["original_width"], image["original_height"]) == (width, height)
    decoded = cv2.imdecode(np.frombuffer(image["jpg"], np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.parametrize("name,reason", [*BAD_FILES.items(), ("missing.jpg", "http_404")])
def test_bad_file_is_counted_under_its_reason(mirror, fetch, name, reason):
    assert fetch("k", f"{mirror.base_url}/{name}") == (None, reason)


@pytest.mark.parametrize(
    "url,expected",
    [
        (f"http://127.0.0.1:{closed_loopback_port()}/a.jpg", "connection_error"),
        ("http://", "blocked_address"),  # no host
        ("not a url", "missing_file"),  # a relative path that does not exist
        ("ftp://127.0.0.1:1/a.jpg", "bad_source"),  # neither a web URL nor an object store
    ],
)
def test_failed_fetch_returns_a_reason_and_never_raises(fetch, url, expected):
    assert fetch("k", url) == (None, expected)


def test_loopback_urls_are_refused_unless_allowed(mirror):
    guarded = ImageFetcher(DownloadParams(image_size=IMAGE_SIZE, retries=0))
    before = mirror.requests_served
    assert guarded("k", f"{mirror.base_url}/square.jpg") == (None, "blocked_address")
    assert mirror.requests_served == before  # refused before any connection


def test_files_are_read_from_s3(fetch, s3_env):
    """ShareGPT4V's images live under an s3:// prefix (moto on loopback)."""
    import s3fs

    s3fs.S3FileSystem().pipe(f"{S3_BUCKET}/images/a.jpg", encode_jpeg(40, 40, 6))
    image, reason = fetch("k", f"s3://{S3_BUCKET}/images/a.jpg")
    assert reason == "" and (image["width"], image["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert fetch("k", f"s3://{S3_BUCKET}/images/absent.jpg") == (None, "missing_file")


def test_files_are_read_from_paths(mirror, fetch, tmp_path):
    path = tmp_path / "local.jpg"
    path.write_bytes(encode_jpeg(40, 40, 5))
    image, reason = fetch("k", str(path))
    assert reason == "" and (image["width"], image["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
    assert fetch("k", str(tmp_path / "absent.jpg")) == (None, "missing_file")


def test_refused_connection_is_a_connection_error(fetch):
    port = closed_loopback_port()
    assert fetch("k", f"http://127.0.0.1:{port}/a.jpg") == (None, "connection_error")


def test_server_that_never_answers_is_a_timeout():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        fetcher = ImageFetcher(DownloadParams(image_size=IMAGE_SIZE, timeout_s=0.3, retries=0, allow_loopback=True))
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.jpg"
        assert fetcher("k", url) == (None, "timeout")


def test_image_below_the_minimum_size_is_refused(mirror):
    fetcher = ImageFetcher(DownloadParams(image_size=IMAGE_SIZE, min_image_size=41, retries=0, allow_loopback=True))
    assert fetcher("k", f"{mirror.base_url}/square.jpg") == (None, "image_too_small")


@pytest.mark.parametrize(
    "message,reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("HTTP Error: weird", "http_error"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
        ("<urlopen error [Errno -2] Name or service not known>", "connection_error"),
        ("timed out", "timeout"),
        ("<urlopen error timed out>", "timeout"),
        ("The read operation timed out", "timeout"),
        ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_header"),
        ("Remote end closed connection without response", "connection_error"),
        ("[Errno 104] Connection reset by peer", "connection_error"),
        ("something unexpected", "download_error"),
        ("", "download_error"),
    ],
)
def test_classify_download_error(message, reason):
    assert classify_download_error(message) == reason


@pytest.mark.parametrize(
    "message,reason",
    [
        ("Image decoding error", "decode_error"),
        ("image too small", "image_too_small"),
        ("image area too large", "image_too_large"),
        ("aspect ratio too large", "bad_aspect_ratio"),
        ("OpenCV(4.x) error: (-215:Assertion failed) !buf.empty()", "decode_error"),
    ],
)
def test_classify_resize_error(message, reason):
    assert classify_resize_error(message) == reason


def test_truncation_check_looks_for_the_end_marker():
    jpeg = encode_jpeg(64, 64, 0)
    assert not is_truncated_jpeg(jpeg)
    assert is_truncated_jpeg(jpeg[:-2]) and is_truncated_jpeg(jpeg[:200])
    assert all(is_truncated_jpeg(jpeg[:n]) for n in range(2, len(jpeg) - 1, 97))
    assert not is_truncated_jpeg(b"\x89PNG\r\n\x1a\n")  # only JPEGs are judged


def motion_photo(jpeg: bytes, seed: int) -> bytes:
    """A JPEG followed by a video, as phones store motion photos: the last kilobytes are MP4
    data (random bytes here, so no end marker among them, and 0xFF bytes that are not)."""
    video = np.random.default_rng(seed).integers(0, 256, 8192, dtype=np.uint8).tobytes()
    return jpeg + b"\x00\x00\x00\x18ftypmp42" + video.replace(b"\xff\xd9", b"\xff\x00")


def with_embedded_jpeg(jpeg: bytes, thumbnail: bytes) -> bytes:
    """`jpeg` with a whole JPEG (a thumbnail, as EXIF carries one) in a comment segment."""
    segment = b"\xff\xfe" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    return jpeg[:2] + segment + jpeg[2:]


def test_truncation_is_judged_from_the_marker_structure():
    jpeg, thumbnail = encode_jpeg(64, 48, 1), encode_jpeg(16, 12, 2)
    progressive = io.BytesIO()
    Image.fromarray(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)).save(
        progressive, format="JPEG", progressive=True
    )
    assert not is_truncated_jpeg(motion_photo(jpeg, 0))  # data after the end marker
    assert not is_truncated_jpeg(progressive.getvalue())  # several scans
    scans = progressive.getvalue().count(b"\xff\xda")
    assert scans > 1 and is_truncated_jpeg(progressive.getvalue()[:-2])
    # Cut between two scans: every scan so far is whole, the end marker is missing.
    assert is_truncated_jpeg(progressive.getvalue()[: progressive.getvalue().rindex(b"\xff\xda")])
    whole = with_embedded_jpeg(jpeg, thumbnail)
    assert not is_truncated_jpeg(whole)
    # Cut just after the thumbnail: its end marker is among the last bytes, not the image's.
    cut = whole[: 2 + 4 + len(thumbnail) + 300]
    assert cut[-1024:].find(b"\xff\xd9") >= 0 and is_truncated_jpeg(cut)


def test_motion_photo_is_stored_and_truncated_jpeg_is_not(fetch, tmp_path):
    jpeg = encode_jpeg(96, 64, 3)
    (tmp_path / "motion.jpg").write_bytes(motion_photo(jpeg, 1))
    (tmp_path / "cut.jpg").write_bytes(motion_photo(jpeg, 1)[: len(jpeg) - 40])
    image, reason = fetch("k", str(tmp_path / "motion.jpg"))
    assert reason == "" and (image["width"], image["original_width"]) == (IMAGE_SIZE, 96)
    assert fetch("k", str(tmp_path / "cut.jpg")) == (None, "truncated_image")


def group_for(url: str, n_captions: int) -> dict:
    return {
        "key": sample_key(url),
        "source": url,
        "captions": [{"text": f"caption {i} of {url}", "source": "test", "kind": "short"} for i in range(n_captions)],
    }


def test_shard_builder_publishes_good_images_and_counts_failures(mirror, tmp_path):
    good = [group_for(f"{mirror.base_url}/{name}", 1 + i) for i, name in enumerate(GOOD_SIZES)]
    bad = [group_for(f"{mirror.base_url}/{name}", 1) for name in [*BAD_FILES, "missing.jpg"]]
    bad.append(group_for(f"http://127.0.0.1:{closed_loopback_port()}/gone.jpg", 1))
    build_uri = str(tmp_path / "demo" / "build0")

    result = ShardBuilder(build_uri, PARAMS)(4, bad[:2] + good + bad[2:])

    assert result["failures"] == {
        "truncated_image": 1,
        "not_an_image": 1,
        "empty_file": 1,
        "http_404": 1,
        "connection_error": 1,
    }
    assert result["n_groups"] == len(good) + len(bad)
    assert result["n_captions_written"] == sum(len(g["captions"]) for g in good)
    fs, build_path = storage.open_storage(build_uri)
    entry = result["shard"]
    assert entry["n_samples"] == len(good)
    stats = shards.read_shard_stats(fs, build_path, 4)
    assert stats == {k: v for k, v in result.items() if k != "seconds"}
    tar_path, index_path = shards.shard_paths(build_path, 4)
    assert sorted(p.name for p in (tmp_path / "demo" / "build0").rglob("*") if p.is_file()) == sorted(
        ["000004.tar", "000004.parquet"]
    )  # published, no temporaries left
    assert sorted(pq.read_table(index_path).column("key").to_pylist()) == sorted(g["key"] for g in good)

    samples = shards.read_shard_samples(fs, build_path, entry, verify=True)
    groups = {g["key"]: g for g in good}
    assert sorted(s[shards.KEY] for s in samples) == sorted(groups)
    for sample in samples:
        grey = cv2.imdecode(np.frombuffer(sample[shards.IMAGE], np.uint8), cv2.IMREAD_GRAYSCALE)
        assert grey is not None and grey.shape == (IMAGE_SIZE, IMAGE_SIZE)
        edge = decode_edge_png(sample[shards.EDGE])
        assert edge.shape == edge_map_shape(*grey.shape)
        assert_edges_of(edge, grey)  # the edge map of this very image
        meta = json.loads(sample[shards.META])
        group = groups[sample[shards.KEY]]
        assert meta["source"] == group["source"] and meta["captions"] == group["captions"]
        assert (meta["width"], meta["height"]) == (IMAGE_SIZE, IMAGE_SIZE)
        name = group["source"].rsplit("/", 1)[1]
        assert (meta["original_width"], meta["original_height"]) == GOOD_SIZES[name]


def test_shard_builder_with_only_failures_publishes_an_empty_shard(mirror, tmp_path):
    groups = [group_for(f"{mirror.base_url}/missing-{i}.jpg", 2) for i in range(3)]
    result = ShardBuilder(str(tmp_path / "b"), PARAMS)(0, groups)
    assert result["failures"] == {"http_404": 3}
    assert result["shard"]["n_samples"] == 0 and result["n_captions_written"] == 0
    fs, build_path = storage.open_storage(str(tmp_path / "b"))
    assert shards.read_shard_samples(fs, build_path, result["shard"], verify=True) == []


def shard_files(fs, build_path: str, shard_id: int) -> tuple[bytes, bytes]:
    tar_path, index_path = shards.shard_paths(build_path, shard_id)
    return fs.cat_file(tar_path), pq.read_table(index_path).to_pylist()


def test_shards_built_together_match_shards_built_one_at_a_time(mirror, tmp_path):
    """build_many streams several shards through one pool (one of them empty, one all
    failures): each shard and its stats are those of building it alone."""
    names = [*GOOD_SIZES, *BAD_FILES, "missing.jpg"]
    specs = [
        (7, [group_for(f"{mirror.base_url}/{n}", 1 + i % 2) for i, n in enumerate(names)]),
        (8, []),
        (9, [group_for(f"{mirror.base_url}/missing-{i}.jpg", 1) for i in range(3)]),
        (10, [group_for(f"{mirror.base_url}/{n}?copy", 2) for n in reversed(list(GOOD_SIZES))]),
    ]
    together, alone = str(tmp_path / "together"), str(tmp_path / "alone")
    many = ShardBuilder(together, PARAMS).build_many(specs)
    single = [ShardBuilder(alone, PARAMS)(shard_id, groups) for shard_id, groups in specs]
    drop = lambda stats: {k: v for k, v in stats.items() if k != "seconds"}  # noqa: E731
    assert [drop(s) for s in many] == [drop(s) for s in single]
    assert [s["shard"]["n_samples"] for s in many] == [len(GOOD_SIZES), 0, 0, len(GOOD_SIZES)]
    (fs_a, path_a), (fs_b, path_b) = storage.open_storage(together), storage.open_storage(alone)
    for shard_id, _ in specs:
        assert shard_files(fs_a, path_a, shard_id) == shard_files(fs_b, path_b, shard_id)


def test_an_error_in_a_download_thread_fails_the_task_and_stops_the_rest(mirror, tmp_path, monkeypatch):
    """Not a reason to count (those are returned): a bug raises in the task's thread, and the
    queued downloads are cancelled rather than run to the end."""
    builder = ShardBuilder(str(tmp_path / "b"), PARAMS)
    calls = []

    def broken(key, source):
        calls.append(source)
        time.sleep(0.01)  # all 200 would take 0.5 s on 4 threads
        raise RuntimeError("a bug in the fetcher")

    monkeypatch.setattr(builder.fetch, "fetch_bytes", broken)
    groups = [group_for(f"{mirror.base_url}/{i}.jpg", 1) for i in range(200)]
    with pytest.raises(RuntimeError, match="a bug in the fetcher"):
        builder.build_many([(0, groups[:100]), (1, groups[100:])])
    assert len(calls) < len(groups)
    fs, build_path = storage.open_storage(str(tmp_path / "b"))
    assert not fs.exists(shards.shard_paths(build_path, 0)[0])  # nothing half-written
