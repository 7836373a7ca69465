"""Synthetic inputs in the published layouts of YFCC100M (metadata + OpenAI's subset list) and
ShareGPT4V (one JSON array), for the planning benchmark: no images, only the text a prepare
job plans from. Written in streamed blocks, so a 10 M-line file never sits in memory."""

from __future__ import annotations

import json
import random
from pathlib import Path

YFCC_BLOCK = 100_000
WORDS = [f"w{i:04d}" for i in range(4000)]


def yfcc_metadata_line(photo_id: int, n: int, rng: random.Random) -> str:
    """A 23-column metadata line: id, user, dates, device, URL-encoded title and description,
    tags, geo, page and download URLs, licence, server/farm/secrets, extension, marker."""
    title = "+".join(rng.choices(WORDS, k=rng.randint(1, 6)))
    description = "+".join(rng.choices(WORDS, k=rng.randint(0, 20)))
    marker = "1" if rng.random() < 0.01 else "0"
    return (
        f"{photo_id}\t{n % 50000}@N00\tuser{n % 50000}\t2010-01-01 00:00:00.0\t1262304000\t"
        f"Canon+EOS\t{title}\t{description}\ttag1,tag2\t\t\t\t\t"
        f"http://www.flickr.com/photos/u/{photo_id}/\thttp://farm1.staticflickr.com/1/{photo_id}_ab.jpg\t"
        f"Attribution\thttp://creativecommons.org/licenses/by/2.0/\t1\t1\tab\tcd\tjpg\t{marker}\n"
    )


def write_yfcc(metadata: Path, subset: Path, n_lines: int, subset_share: float = 0.15, seed: int = 0) -> int:
    """Metadata with n_lines photos (ids shuffled, unique) and a subset list naming about
    subset_share of them plus 0.1 % ids the metadata lacks; returns the subset's length."""
    rng = random.Random(seed)
    n_subset = 0
    with open(metadata, "w") as meta, open(subset, "w") as sub:
        for start in range(0, n_lines, YFCC_BLOCK):
            ids = [7_000_000_000 + 3 * n + rng.randrange(3) for n in range(start, min(start + YFCC_BLOCK, n_lines))]
            meta.write("".join(yfcc_metadata_line(i, start + k, rng) for k, i in enumerate(ids)))
            chosen = [i for i in ids if rng.random() < subset_share]
            chosen += [i + 10**11 for i in chosen[: len(chosen) // 1000]]  # ids without metadata
            sub.write("".join(f"{n_subset + k}\t{i}\t{i:032x}\n" for k, i in enumerate(chosen)))
            n_subset += len(chosen)
    return n_subset


def sharegpt4v_record(i: int, rng: random.Random) -> dict:
    image = f"coco/train2017/{i:012d}.jpg" if i % 10 == 0 else f"sam/images/sa_{i}.jpg"
    sentences = [
        " ".join(rng.choices(WORDS, k=rng.randint(8, 20))).capitalize() + "." for _ in range(rng.randint(3, 8))
    ]
    return {
        "id": str(i),
        "image": image,
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": " ".join(sentences)},
        ],
    }


def write_sharegpt4v(path: Path, n_records: int, seed: int = 0) -> None:
    """One JSON array of n_records ShareGPT4V-shaped records (about 1 KB each), indented as
    the published file is."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("[\n")
        for start in range(0, n_records, YFCC_BLOCK):
            stop = min(start + YFCC_BLOCK, n_records)
            f.write(",\n".join(json.dumps(sharegpt4v_record(i, rng), indent=1) for i in range(start, stop)))
            f.write(",\n" if stop < n_records else "\n")
        f.write("]\n")
