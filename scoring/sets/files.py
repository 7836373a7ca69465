"""Where benchmark files live: a local folder or an `s3://` prefix, behind one fsspec interface
(pipelines.storage). Readers refer to an image by URI (read by the encoders when they need it)
or carry its bytes (images read out of tar shards)."""

from __future__ import annotations

from pathlib import Path

from pipelines import storage

ImageRef = str | bytes  # a file's URI, a byte range of one (a tar member), or the encoded image itself
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
RANGE_MARK = "::bytes="  # `<uri>::bytes=<offset>+<size>`: an image stored inside a larger file


def range_ref(uri: str, offset: int, size: int) -> str:
    return f"{uri}{RANGE_MARK}{offset}+{size}"


class Location:
    """A folder (local or s3://) with the few operations the readers need."""

    def __init__(self, uri: str | Path):
        self.uri = str(uri).rstrip("/")
        self.fs, self.path = storage.open_storage(self.uri)
        self.remote = self.uri.startswith("s3://")

    def child(self, *parts: str) -> "Location":
        return Location(storage.join(self.uri, *[p for p in parts if p]))

    def ref(self, path: str) -> str:
        """The URI of a bare fsspec path below this location."""
        return f"s3://{path}" if self.remote else path

    def exists(self) -> bool:
        return self.fs.exists(self.path)

    def is_dir(self) -> bool:
        return self.fs.isdir(self.path)

    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def read_bytes(self) -> bytes:
        if not self.fs.isfile(self.path):
            raise FileNotFoundError(f"missing file: {self.uri}")
        return storage.read_bytes(self.fs, self.path)

    def read_text(self, what: str = "") -> str:
        if not self.fs.isfile(self.path):
            raise FileNotFoundError(f"missing {what + ' ' if what else ''}file: {self.uri}")
        return self.read_bytes().decode("utf-8")

    def entries(self, dirs: bool) -> list[tuple[str, str]]:
        """(name, URI) of the visible sub-folders (dirs=True) or files, sorted by name."""
        if not self.is_dir():
            raise FileNotFoundError(f"missing folder {self.uri}")
        found = []
        for info in self.fs.ls(self.path, detail=True):
            name = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if not name.startswith(".") and (info["type"] == "directory") == dirs:
                found.append((name, self.ref(info["name"].rstrip("/"))))
        return sorted(found)

    def image_files(self) -> list[tuple[str, str]]:
        """(name, URI) of the image files directly inside, sorted by name."""
        return [(n, u) for n, u in self.entries(dirs=False) if Path(n).suffix.lower() in IMAGE_SUFFIXES]


def read_lines(location: Location, what: str) -> list[str]:
    """The stripped, non-blank lines of a text file; a missing file names `what` it holds."""
    lines = [line.strip() for line in location.read_text(what).splitlines()]
    return [line for line in lines if line]


def read_image(ref: ImageRef) -> bytes:
    """The encoded bytes of an image reference."""
    if isinstance(ref, bytes):
        return ref
    uri, mark, span = ref.rpartition(RANGE_MARK)
    if not mark:
        return Location(ref).read_bytes()
    offset, size = (int(x) for x in span.split("+"))
    location = Location(uri)
    with location.fs.open(location.path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise ValueError(f"{uri} ends before byte {offset + size}: the file changed since it was listed")
    return data


def check_files_exist(refs: list[str], source: str) -> None:
    """Fail before any encoding starts, naming one missing file, rather than mid-run at decode.
    Lists each parent folder once (one request per folder on s3, not one per image)."""
    present: dict[str, set] = {}
    missing = []
    for ref in refs:
        parent, _, name = ref.rpartition("/")
        if parent not in present:
            location = Location(parent or ".")
            present[parent] = {n for n, _ in location.entries(dirs=False)} if location.is_dir() else set()
        if name not in present[parent]:
            missing.append(ref)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(refs)} images listed in {source} are missing, e.g. {missing[0]}"
        )
