"""The CPU stages of every prepare job: download (img2dataset), resize once, Sobel edges, write.

Each stage is a plain callable (state in `__init__`, work in `__call__`) so tests call them
without Ray; `pipelines/build.py` composes them into one Ray Data task per shard, so image
bytes never travel through the object store.
"""
from __future__ import annotations

import io
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from img2dataset.downloader import download_image_with_retry
from img2dataset.resizer import Resizer

from pipelines import edges, shards, storage

USER_AGENT_TOKEN = "clipforge"
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


@dataclass(frozen=True)
class DownloadParams:
    """Everything that changes the stored image (enters the build id)."""
    image_size: int = 256
    resize_mode: str = "center_crop"
    encode_quality: int = 95
    min_image_size: int = 0
    max_image_area: float = 178956970.0  # PIL's decompression-bomb limit
    timeout_s: float = 10.0
    retries: int = 1
    thread_count: int = 16


def classify_download_error(message: str) -> str:
    """Manifest reason for an img2dataset download error string."""
    text = message.lower()
    if "http error" in text:
        code = text.split("http error", 1)[1].strip().split(":", 1)[0]
        return f"http_{code}" if code.isdigit() else "http_error"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "disallowed" in text:
        return "disallowed_by_header"
    if "refused" in text or "urlopen error" in text or "name or service" in text:
        return "connection_error"
    return "download_error"


def classify_resize_error(message: str) -> str:
    known = {"image decoding error": "decode_error", "image too small": "image_too_small",
             "image area too large": "image_too_large", "aspect ratio too large": "bad_aspect_ratio"}
    return known.get(message.lower().strip(), "decode_error")


def is_truncated_jpeg(data: bytes) -> bool:
    """A JPEG without its end-of-image marker near the end was cut off (OpenCV would
    silently decode the top part and grey out the rest)."""
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-1024:]


class ImageFetcher:
    """Downloads each URL once with img2dataset's downloader and resizes it once."""

    def __init__(self, params: DownloadParams):
        self.params = params
        self.resizer = Resizer(image_size=params.image_size, resize_mode=params.resize_mode,
                               resize_only_if_bigger=False, encode_quality=params.encode_quality,
                               encode_format="jpg", min_image_size=params.min_image_size,
                               max_image_area=params.max_image_area)

    def __call__(self, key: str, url: str) -> tuple[dict | None, str]:
        """(image record, "") on success, (None, reason) on failure."""
        _, stream, err = download_image_with_retry(
            (key, url), timeout=self.params.timeout_s, retries=self.params.retries,
            user_agent_token=USER_AGENT_TOKEN,
            disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES)
        if stream is None:
            return None, classify_download_error(err or "")
        raw = stream.getvalue()
        if is_truncated_jpeg(raw):
            return None, "truncated_image"
        jpg, width, height, orig_w, orig_h, err = self.resizer(io.BytesIO(raw))
        if err is not None or jpg is None:
            return None, classify_resize_error(err or "image decoding error")
        return {"jpg": jpg, "width": width, "height": height,
                "original_width": orig_w, "original_height": orig_h}, ""


def build_sample(group: dict, image: dict) -> dict:
    """A shard sample row from a caption group and its downloaded image."""
    meta = {"key": group["key"], "source": group["url"], "captions": group["captions"],
            "width": image["width"], "height": image["height"],
            "original_width": image["original_width"],
            "original_height": image["original_height"]}
    return {shards.KEY: group["key"], shards.IMAGE: image["jpg"],
            shards.EDGE: edges.compute_edge_png(image["jpg"]),
            shards.META: json.dumps(meta, sort_keys=True)}


class ShardBuilder:
    """One shard end to end: download its groups, add edge maps, publish tar + index.

    Returns a small stats row; failures are counted by reason, never raised.
    """

    def __init__(self, build_uri: str, params: DownloadParams):
        self.build_uri, self.params = build_uri, params
        self.fetch = ImageFetcher(params)

    def __call__(self, shard_id: int, groups: list[dict]) -> dict:
        start = time.monotonic()
        with ThreadPoolExecutor(self.params.thread_count) as pool:
            fetched = list(pool.map(lambda g: self.fetch(g["key"], g["url"]), groups))
        samples, failures = [], Counter()
        for group, (image, reason) in zip(groups, fetched):
            if image is None:
                failures[reason] += 1
                continue
            try:
                samples.append(build_sample(group, image))
            except ValueError:
                failures["decode_error"] += 1
        stats = {"failures": dict(failures), "n_groups": len(groups),
                 "n_captions_written": sum(len(json.loads(s[shards.META])["captions"])
                                           for s in samples)}
        fs, build_path = storage.open_storage(self.build_uri)
        entry = shards.write_shard(fs, build_path, shard_id, samples, stats)
        return {"shard": entry, **stats, "seconds": time.monotonic() - start}


def download_params_dict(params: DownloadParams) -> dict:
    return asdict(params)
