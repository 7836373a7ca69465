"""The revisited Oxford and Paris landmark sets (Radenović et al., CVPR 2018), in their
published layout: a folder holding `gnd_roxford5k.pkl` (or `gnd_rparis6k.pkl`) and `jpg/`.

The ground-truth pickle holds `imlist` (gallery names, no suffix), `qimlist` (query names) and
`gnd`, one dict per query: `bbx` (x1, y1, x2, y2, the query's region), `easy`, `hard`, `junk`
(gallery indices). As in the protocol, each query is its image cropped to `bbx`. The pickle
is read with an unpickler that builds only dicts, lists, numbers, strings and numpy arrays, so
a tampered file cannot run code. Optional distractors (R1M) are more gallery images listed one
relative path per line, never relevant to any query."""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import cv2
import numpy as np

from scoring.sets.files import Location, read_image, read_lines

GROUND_TRUTH = {"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"}
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


@dataclass(frozen=True)
class LandmarkSet:
    name: str
    images: list  # gallery references (URIs), then distractors
    queries: list  # query crops (PNG bytes)
    ground_truth: list[dict]  # per query: {"easy", "hard", "junk"}: int arrays of gallery indices
    protocol: str = "revisited"

    @property
    def n_images(self) -> int:
        return len(self.images)


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"ground-truth file refers to {module}.{name}; only data is allowed")
        return super().find_class(module, name)


def read_ground_truth(data: bytes) -> dict:
    return _DataOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def crop_query(image: bytes, box) -> bytes:
    """The query region (x1, y1, x2, y2, inclusive pixel bounds as the protocol's code rounds
    them) as lossless PNG bytes."""
    decoded = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
    if decoded is None:
        raise ValueError("a query image does not decode")
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    ok, png = cv2.imencode(".png", decoded[max(y1, 0) : y2 + 1, max(x1, 0) : x2 + 1])
    return png.tobytes()


def load_revisited(path: str, name: str = "", distractors: str | None = None) -> LandmarkSet:
    """A revisited Oxford / Paris folder; `name` picks the pickle when both are present."""
    root = Location(path)
    names = [name] if name else [n for n in GROUND_TRUTH if root.child(GROUND_TRUTH[n]).exists()]
    if len(names) != 1 or names[0] not in GROUND_TRUTH:
        raise ValueError(
            f"{path}: expected exactly one of {sorted(GROUND_TRUTH.values())} (or name=roxford5k/rparis6k)"
        )
    truth = read_ground_truth(root.child(GROUND_TRUTH[names[0]]).read_bytes())
    images = [root.child("jpg", f"{n}.jpg").uri for n in truth["imlist"]]
    queries = [
        crop_query(read_image(root.child("jpg", f"{n}.jpg").uri), g["bbx"])
        for n, g in zip(truth["qimlist"], truth["gnd"])
    ]
    ground_truth = [
        {k: np.asarray(g.get(k, []), dtype=np.int64) for k in ("easy", "hard", "junk")} for g in truth["gnd"]
    ]
    if distractors:
        listing = Location(distractors)
        folder = Location(listing.uri.rsplit("/", 1)[0])
        images += [folder.child(line).uri for line in read_lines(listing, "distractor list")]
    return LandmarkSet(names[0], images, queries, ground_truth, "revisited" + (" + distractors" if distractors else ""))
