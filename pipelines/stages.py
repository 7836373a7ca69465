"""The CPU stages of every prepare job: fetch (img2dataset for URLs, fsspec for files), check
and normalise the source image, resize once (img2dataset), Sobel edges, write.

Each stage is a plain callable (state in `__init__`, work in `__call__`) so tests call them
without Ray; `pipelines/build.py` composes them into Ray Data tasks of a few shards, so image
bytes never travel through the object store.
"""

from __future__ import annotations

import functools
import io
import json
import queue
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


from pipelines import edges, image_input, img2dataset_modules, shards, storage, url_guard

USER_AGENT_TOKEN = "clipforge"
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass(frozen=True)
class DownloadParams:
    """Everything that changes the stored image (enters the build id)."""

    image_size: int = 256
    resize_mode: str = "center_crop"
    encode_quality: int = 95
    min_image_size: int = 32  # shorter side, in source pixels
    max_image_area: int = 89_478_485  # source pixels; Pillow's decompression-bomb warning level
    allow_loopback: bool = False  # fetch URLs on 127.0.0.0/8 (the demo mirror, tests)
    timeout_s: float = 10.0
    retries: int = 1
    thread_count: int = 16


def classify_download_error(message: str) -> str:
    """Manifest reason for an img2dataset download error string."""
    text = message.lower()
    if url_guard.BLOCKED_REASON in text:
        return url_guard.BLOCKED_REASON
    if "http error" in text:
        code = text.split("http error", 1)[1].strip().split(":", 1)[0]
        return f"http_{code}" if code.isdigit() else "http_error"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "disallowed" in text:
        return "disallowed_by_header"
    if any(m in text for m in ("refused", "urlopen error", "name or service", "reset by peer", "remote end closed")):
        return "connection_error"
    return "download_error"


def classify_resize_error(message: str) -> str:
    known = {
        "image decoding error": "decode_error",
        "image too small": "image_too_small",
        "image area too large": "image_too_large",
        "aspect ratio too large": "bad_aspect_ratio",
    }
    return known.get(message.lower().strip(), "decode_error")


class ImageFetcher:
    """Fetches each source once (a URL through img2dataset's downloader behind the address
    guard, a file through fsspec), checks and normalises it, and resizes it once."""

    def __init__(self, params: DownloadParams):
        # img2dataset is imported by the processes that fetch, not with this module (training
        # workers read builds through pipelines.build), and only its downloader and resizer.
        self.params = params
        self.download = img2dataset_modules.load("downloader").download_image_with_retry

    @functools.cached_property
    def resizer(self):
        """img2dataset's Resizer, imported at the first image (albumentations: ~0.5 s of CPU), so
        that a shard task's download threads are already fetching while it loads."""
        resizer = img2dataset_modules.load("resizer")
        p = self.params
        return resizer.Resizer(
            image_size=p.image_size,
            resize_mode=p.resize_mode,
            resize_only_if_bigger=False,
            encode_quality=p.encode_quality,
            encode_format="jpg",
            min_image_size=p.min_image_size,
            max_image_area=p.max_image_area,
        )

    def __call__(self, key: str, source: str) -> tuple[dict | None, str]:
        """(image record, "") on success, (None, reason) on failure."""
        raw, reason = self.fetch_bytes(key, source)
        return (None, reason) if raw is None else self.image_from(raw)

    def image_from(self, raw: bytes) -> tuple[dict | None, str]:
        """The checked, resized image record of fetched bytes, or (None, reason)."""
        raw, reason = image_input.prepare_source_image(raw, self.params.max_image_area, self.params.min_image_size)
        if raw is None:
            return None, reason
        jpg, width, height, orig_w, orig_h, err = self.resizer(io.BytesIO(raw))
        if err is not None or jpg is None:
            return None, classify_resize_error(err or "image decoding error")
        return {"jpg": jpg, "width": width, "height": height, "original_width": orig_w, "original_height": orig_h}, ""

    def fetch_bytes(self, key: str, source: str) -> tuple[bytes | None, str]:
        if not source.lower().startswith(("http://", "https://")):
            return read_file_source(source)
        if not url_guard.url_allowed(source, self.params.allow_loopback):
            return None, url_guard.BLOCKED_REASON
        with url_guard.guarded_fetch(self.params.allow_loopback):  # pins each connection
            _, stream, err = self.download(
                (key, source),
                timeout=self.params.timeout_s,
                retries=self.params.retries,
                user_agent_token=USER_AGENT_TOKEN,
                disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES,
            )
        if stream is None:
            return None, classify_download_error(err or "")
        return stream.getvalue(), ""


STORAGE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "file")


def read_file_source(uri: str) -> tuple[bytes | None, str]:
    """An image file named by a local path or an object-store URI (`s3://`, ...)."""
    if "://" in uri and uri.split("://", 1)[0].lower() not in STORAGE_SCHEMES:
        return None, "bad_source"
    try:
        fs, path = storage.open_storage(uri)
        return storage.read_bytes(fs, path), ""
    except FileNotFoundError:
        return None, "missing_file"
    except (OSError, ValueError):
        return None, "read_error"


def build_sample(group: dict, image: dict) -> dict:
    """A shard sample row from a caption group and its downloaded image."""
    meta = {
        "key": group["key"],
        "source": group["source"],
        "captions": group["captions"],
        "width": image["width"],
        "height": image["height"],
        "original_width": image["original_width"],
        "original_height": image["original_height"],
    }
    return {
        shards.KEY: group["key"],
        shards.IMAGE: image["jpg"],
        shards.EDGE: edges.compute_edge_png(image["jpg"]),
        shards.META: json.dumps(meta, sort_keys=True),
    }


class ShardBuilder:
    """Shards end to end: download their groups, add edge maps, publish tar + index.

    Returns a small stats row per shard; failures are counted by reason, never raised.
    """

    def __init__(self, build_uri: str, params: DownloadParams):
        self.build_uri = build_uri
        self.params = params
        self.fetch = ImageFetcher(params)

    def __call__(self, shard_id: int, groups: list[dict]) -> dict:
        return self.build_many([(shard_id, groups)])[0]

    def build_many(self, specs: list[tuple[int, list[dict]]]) -> list[dict]:
        """Several shards through one pool of download threads that only fetch; this thread
        checks, resizes and adds edge maps in the order downloads finish, and writes each
        shard, complete, as soon as its last group is done (img2dataset's split too: its
        threads download, its process resizes). Every group is queued at once, so the threads
        go on to the next shard's downloads while the current shard's slowest requests finish
        and while it is written; no thread waits on the CPU work, so the thread budget stays
        in flight."""
        fetched: queue.SimpleQueue = queue.SimpleQueue()
        pool = ThreadPoolExecutor(self.params.thread_count)
        try:
            for index, (_, groups) in enumerate(specs):
                for position, group in enumerate(groups):
                    pool.submit(self._download, fetched, index, position, group)
            return self._finish(specs, fetched)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # an error stops the queued downloads

    def _download(self, fetched: queue.SimpleQueue, index: int, position: int, group: dict) -> None:
        try:
            fetched.put((index, position, self.fetch.fetch_bytes(group["key"], group["source"])))
        except BaseException as error:  # raised again in the task's thread
            fetched.put((index, position, error))

    def _finish(self, specs: list[tuple[int, list[dict]]], fetched: queue.SimpleQueue) -> list[dict]:
        built = [[None] * len(groups) for _, groups in specs]
        remaining = [len(groups) for _, groups in specs]
        stats = {}
        start = time.monotonic()
        for index, (shard_id, groups) in enumerate(specs):
            if not groups:
                stats[index] = self.write(shard_id, groups, [], start)
        for _ in range(sum(remaining)):
            index, position, outcome = fetched.get()
            if isinstance(outcome, BaseException):
                raise outcome
            group = specs[index][1][position]
            built[index][position] = self.sample_from(group, *outcome)
            remaining[index] -= 1
            if not remaining[index]:
                stats[index] = self.write(*specs[index], built[index], start)
                start = time.monotonic()
        return [stats[index] for index in range(len(specs))]

    def write(self, shard_id: int, groups: list[dict], built: list[tuple[dict | None, str]], start: float) -> dict:
        samples = [sample for sample, _ in built if sample is not None]
        failures = Counter(reason for sample, reason in built if sample is None)
        # duplicates_merged 0 until dedup says otherwise: a shard it leaves unchanged is
        # published by moving the staged files (dedup.promote_staged).
        stats = {
            "failures": dict(failures),
            "n_groups": len(groups),
            "duplicates_merged": 0,
            "n_captions_written": sum(len(json.loads(s[shards.META])["captions"]) for s in samples),
        }
        fs, build_path = storage.open_storage(self.build_uri)
        entry = shards.write_shard(fs, build_path, shard_id, samples, stats)
        return {"shard": entry, **stats, "seconds": time.monotonic() - start}

    def sample_from(self, group: dict, raw: bytes | None, reason: str) -> tuple[dict | None, str]:
        """(sample, "") or (None, reason) for one group from its fetched bytes (or the
        reason they are missing)."""
        if raw is None:
            return None, reason
        image, reason = self.fetch.image_from(raw)
        if image is None:
            return None, reason
        try:
            return build_sample(group, image), ""
        except ValueError:
            return None, "decode_error"
