"""Text inputs read in byte ranges by Ray Data tasks, so that one large file (CC12M's TSV,
YFCC100M's metadata) is read on every CPU: the ranges cut files only at newlines and read
every line once; a compressed file, which cannot be split, is one range."""

from __future__ import annotations

import numpy as np
import ray
from fsspec.utils import infer_compression

from pipelines import captions, ray_setup, storage

# An uncompressed TSV is read and parsed in byte ranges, one task each, so that one large
# file (CC12M is 12.4 M rows in one TSV) is parsed on every CPU: at most this many bytes a
# range, and small enough that every CPU gets two ranges, down to the minimum.
READ_CHUNK_BYTES = 32 * 2**20
MIN_READ_CHUNK_BYTES = 2**20


def text_chunks(uris: list[str], max_chunk_bytes: int, n_cpus: int = 1) -> list[dict]:
    """Byte ranges [start, end) that cover the files, in order: at most max_chunk_bytes
    each, and at least two per CPU where that leaves them MIN_READ_CHUNK_BYTES or more."""
    sizes = [file_size(uri) for uri in uris]
    chunk_bytes = min(max_chunk_bytes, max(MIN_READ_CHUNK_BYTES, sum(sizes) // (2 * n_cpus)))
    return [
        {"uri": uri, "start": start, "end": min(start + chunk_bytes, size)}
        for uri, size in zip(uris, sizes)
        for start in range(0, size, chunk_bytes)
    ]


def file_size(uri: str) -> int:
    fs, path = storage.open_storage(uri)
    return fs.size(path)


def split_lines(data: bytes) -> list[str]:
    """Lines of text files: decoded as Latin-1 (every byte one character, nothing fails; a
    non-UTF-8 line is then a counted reject, captions.redecode_utf8), split at "\n" only and
    a trailing "\r" dropped, blank lines dropped. str.splitlines would also cut at the
    Latin-1 characters 0x85, 0x0b, 0x0c, 0x1c-0x1e, which are bytes inside UTF-8 letters
    (Cyrillic "х" is D1 85), and so cut such captions in two."""
    lines = data.decode(captions.READ_ENCODING).split("\n")
    return [line[:-1] if line.endswith("\r") else line for line in lines if line.strip()]


def read_chunk_lines(uri: str, start: int, end: int) -> list[str]:
    """The lines that start in bytes [start, end) of a file (split_lines). A line belongs to
    the range that holds its first byte, so the ranges of a file cut it only at newlines and
    read every line once; end = -1 reads the whole file, decompressing it if its name says so."""
    fs, path = storage.open_storage(uri)
    if end < 0:
        with fs.open(path, "rb", compression="infer") as f:
            return split_lines(f.read())
    with fs.open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the line under way started in the range before
        begin = f.tell()
        data = f.read(end - begin) if begin < end else b""
        if data and not data.endswith(b"\n"):
            data += f.readline()
    return split_lines(data)


def read_lines_task(batch: dict) -> dict:
    """Read task: byte ranges of text files -> their lines (column "text")."""
    lines = [
        line
        for uri, start, end in zip(batch["uri"], batch["start"], batch["end"])
        for line in read_chunk_lines(str(uri), int(start), int(end))
    ]
    return {"text": np.array(lines, dtype=object if lines else str)}  # typed even when empty


def line_chunks(uris: list[str]):
    """Ray Data dataset of byte ranges (uri, start, end) covering text files, one row and one
    block each, so one large file (CC12M's 12.4 M-row TSV) is read on every CPU; a compressed
    file, which cannot be split, is one range (end -1). A stage that reads its range itself
    is called for every range, even one that holds no line, and so always gives typed columns."""
    n_cpus = ray_setup.cluster_cpus()
    plain = [u for u in uris if not infer_compression(u)]
    chunks = text_chunks(plain, READ_CHUNK_BYTES, n_cpus) if plain else []
    chunks += [{"uri": u, "start": 0, "end": -1} for u in uris if infer_compression(u)]
    return ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))


def read_text_lines(uris: list[str]):
    """Ray Data dataset of the lines of text files (one column "text", split_lines)."""
    return line_chunks(uris).map_batches(read_lines_task, batch_size=1, batch_format="numpy")
