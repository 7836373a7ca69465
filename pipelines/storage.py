"""Local-folder and `s3://` storage behind one fsspec interface, with atomic publishing.

Credentials and endpoints come from the standard AWS environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE); nothing here records them.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
from fsspec.core import url_to_fs

TMP_MARK = ".tmp-"


def open_storage(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and bare path for a local path or an `s3://` URI."""
    options = {}
    if uri.startswith("s3://"):
        options = s3_options_from_env()
    fs, path = url_to_fs(uri, **options)
    return fs, path.rstrip("/")


def file_sha256(uri: str) -> str:
    """sha256 of a file, local or s3://, read in 4 MiB chunks (never whole in memory)."""
    return sha256_of(*open_storage(uri))


def sha256_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def s3_options_from_env() -> dict:
    """s3fs options for a non-AWS endpoint (moto, MinIO) named in AWS_ENDPOINT_URL."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write under a temporary name, then publish: readers never see a partial file."""
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def move(fs: fsspec.AbstractFileSystem, source: str, path: str) -> None:
    """Rename a complete file into place (a local rename; on S3 a server-side copy, which
    publishes the object whole, then the source's deletion)."""
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.mv(source, path)


def put_file_atomic(fs: fsspec.AbstractFileSystem, local: str, path: str) -> None:
    """`write_bytes_atomic` for a local file, streamed instead of held in memory."""
    tmp = f"{path}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.put(local, tmp)
    fs.mv(tmp, path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as f:
        return f.read()


def remove_stale_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> int:
    """Delete temporaries an interrupted run left behind; returns how many."""
    if not fs.exists(folder):
        return 0
    stale = [p for p in fs.ls(folder, detail=False) if TMP_MARK in p.rsplit("/", 1)[-1]]
    for path in stale:
        fs.rm(path)
    return len(stale)


def arrow_filesystem_for(fs):
    """A pyarrow filesystem for Ray Data I/O through an fsspec filesystem (s3fs keeps a
    non-AWS endpoint, AWS_ENDPOINT_URL, that pyarrow's own S3 client would not)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def arrow_filesystem(uri: str):
    """(pyarrow filesystem or None, path) of a local path or `s3://` URI."""
    fs, path = open_storage(uri)
    return arrow_filesystem_for(fs), (path if uri.startswith("s3://") else uri)
