"""Small YFCC15M and ShareGPT4V corpora in their exact published layouts, with real JPEGs.

Each writer returns what a test should find after preparing the corpus: the sources, the caption
set per image and the reject-reason counts. These expectations are written out by hand here,
from the texts the writer chose, never by calling the readers under test.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
import pandas as pd

from pipelines.captions import CaptionRules, sample_key
from pipelines.demo_corpus import ImageSettings, long_caption, render_jpeg, sample_scene, short_captions, stream_rng

IMAGE_SETTINGS = ImageSettings(image_size=48, jpeg_quality=90)
PLACEHOLDER_BASE_URL = "http://127.0.0.1:9"  # discard port: for tests that never download
YFCC_MIRROR_DIR = "mirror"  # under root; it may be served before the writer fills it
MISSING_PHOTO_ID = 999_999_999  # listed in the subset, absent from the metadata

# --- YFCC15M -----------------------------------------------------------------------------


@dataclass
class YfccFixture:
    metadata_tsv: Path  # yfcc100m_dataset layout, 23 or 25 columns, no header
    subset_tsv: Path  # OpenAI's yfcc100m_subset_data.tsv layout
    joined_csv: Path  # subset joined with the metadata: id,url,title,description,marker
    joined_parquet: Path
    mirror_root: Path  # serve with pipelines/mirror.py; URLs = base URL + relative path
    columns: int
    subset_ids: list[int]
    # Over the records of the subset that the metadata holds (what the joined tables hold):
    expected_captions: dict[str, set[str]]  # image URL -> kept captions (groups with >= 1)
    expected_reasons: Counter  # reject reason -> rows (two rows per photo record)
    n_subset_records: int  # subset ids found in the metadata
    # Reading the metadata file itself adds these:
    malformed_lines: int  # lines giving reason "malformed_row"
    metadata_only_ids: list[int]  # photos in the metadata but not in the subset

    @property
    def expected_keys(self) -> set[str]:
        return {sample_key(url) for url in self.expected_captions}


@dataclass
class _YfccPhoto:
    photo_id: int
    title: bytes  # as written to the TSV (URL-encoded, or raw bytes)
    description: bytes
    title_text: str  # the readable text of each field as the joined table stores it
    description_text: str
    kept: list[str]  # expected kept captions
    reasons: list[str]  # expected reject reasons
    is_video: bool = False
    url_ok: bool = True
    image: bool = True


def yfcc_encode(text: str) -> bytes:
    """A field as YFCC100M publishes it: URL-encoded with "+" for spaces."""
    return quote_plus(text).encode("ascii")


def plain_photo(
    photo_id: int, title: str, description: str, kept: list[str], reasons: list[str], **flags
) -> _YfccPhoto:
    return _YfccPhoto(
        photo_id, yfcc_encode(title), yfcc_encode(description), title, description, kept, reasons, **flags
    )


def normal_photos(n_photos: int, seed: int, first_id: int) -> list[_YfccPhoto]:
    """Photos whose captions are scene descriptions: some with an empty description, some whose
    description repeats the title."""
    photos = []
    for i in range(n_photos):
        rng = stream_rng(seed, 10, i)
        scene = sample_scene(rng)
        title, description = short_captions(scene, rng)[0], long_caption(scene)
        if i % 3 == 0:
            photo = plain_photo(first_id + i, title, "", [title], ["empty_caption"])
        elif i % 3 == 1:
            photo = plain_photo(first_id + i, title, title, [title], ["duplicate_caption"])
        else:
            photo = plain_photo(first_id + i, title, description, [title, description], [])
        photos.append(photo)
    return photos


def special_photos(first_id: int, rules: CaptionRules) -> list[_YfccPhoto]:
    """One photo per rule: video, camera titles, HTML and escapes, empty, too long, non-UTF-8."""
    long_text = "a very long description " * (rules.max_caption_chars // 24 + 2)
    html_title = "<b>Sunset</b> at the   pier"
    html_description = '<a href="http://x.example/p">Pier &amp;amp; sea</a><br/>\n\tat dusk, C++ 100%'
    i = iter(range(first_id, first_id + 100))
    return [
        plain_photo(next(i), "a video of the sea", "waves", [], ["video"], is_video=True),
        plain_photo(
            next(i),
            "IMG_0042.JPG",
            "a red circle on a grey background",
            ["a red circle on a grey background"],
            ["camera_default_title"],
        ),
        plain_photo(next(i), "dsc_0001", "", [], ["camera_default_title", "empty_caption"]),
        plain_photo(next(i), html_title, html_description, ["Sunset at the pier", "Pier & sea at dusk, C++ 100%"], []),
        plain_photo(next(i), "", "", [], ["empty_caption", "empty_caption"]),
        plain_photo(next(i), "a blue square", long_text, ["a blue square"], ["caption_too_long"]),
        _YfccPhoto(
            next(i),
            b"Caf\xe9+terrace",
            yfcc_encode("IMG of my cat"),
            "Caf\ufffd terrace",
            "IMG of my cat",
            ["IMG of my cat"],
            ["non_utf8_caption"],
        ),
        plain_photo(next(i), "a photo with no URL", "", [], ["bad_url"], url_ok=False, image=False),
    ]


def yfcc_relative_path(photo_id: int) -> str:
    return f"{photo_id % 7}/{photo_id}_{photo_id * 7919 % 65536:04x}.jpg"


def metadata_line(photo: _YfccPhoto, url: str, columns: int, line_number: int) -> bytes:
    """One metadata line in the published column order (see pipelines/yfcc.py)."""
    fields = [
        str(photo.photo_id).encode(),
        b"12345678@N00",
        b"someone",
        b"2012-05-12 12:34:56.0",
        b"1336826096",
        b"Canon+EOS+400D",
        photo.title,
        photo.description,
        b"sea,pier",
        b"",
        b"-0.1",
        b"51.5",
        b"16",
        f"http://www.flickr.com/photos/x/{photo.photo_id}/".encode(),
        url.encode(),
        b"Attribution License",
        b"http://creativecommons.org/licenses/by/2.0/",
        b"7",
        b"8",
        b"abcdef0123",
        b"0123abcdef",
        b"jpg",
        b"1" if photo.is_video else b"0",
    ]
    if columns == 25:
        fields = [str(line_number).encode(), fields[0], photo_hash(photo.photo_id), *fields[1:]]
    return b"\t".join(fields) + b"\n"


def photo_hash(photo_id: int) -> bytes:
    return f"{photo_id * 2654435761 % 2**128:032x}".encode()


def write_yfcc_fixture(
    root: Path,
    image_base_url: str | None,
    n_photos: int = 9,
    seed: int = 0,
    *,
    columns: int = 23,
    subset_header: bool = True,
    rules: CaptionRules = CaptionRules(),
) -> YfccFixture:
    """Metadata TSV, subset TSV, joined CSV/Parquet and JPEGs (under root/YFCC_MIRROR_DIR) of a
    corpus with n_photos ordinary photos plus one photo per rule; two more photos are outside the
    subset. Download URLs are image_base_url + relative path (PLACEHOLDER_BASE_URL when None)."""
    if columns not in (23, 25):
        raise ValueError(f"YFCC100M metadata has 23 or 25 columns, not {columns}")
    root, base = Path(root), (image_base_url or PLACEHOLDER_BASE_URL).rstrip("/")
    photos = normal_photos(n_photos, seed, 1000) + special_photos(5000, rules)
    outside = normal_photos(2, seed + 1, 9000)
    urls = {p.photo_id: f"{base}/{yfcc_relative_path(p.photo_id)}" if p.url_ok else "" for p in photos + outside}
    write_yfcc_images(root / YFCC_MIRROR_DIR, photos, seed)
    metadata_tsv = root / "yfcc100m_dataset.tsv"
    lines = [metadata_line(p, urls[p.photo_id], columns, n) for n, p in enumerate(photos + outside)]
    lines.insert(3, b"this\tline\tis\tmalformed\n")
    metadata_tsv.write_bytes(b"".join(lines))
    subset_ids = [p.photo_id for p in photos] + [MISSING_PHOTO_ID]
    subset_tsv = root / "yfcc100m_subset_data.tsv"
    header = ["line_number\tphotoid\tphoto_hash\n"] if subset_header else []
    subset_tsv.write_text("".join(header + [f"{n}\t{i}\t{photo_hash(i).decode()}\n" for n, i in enumerate(subset_ids)]))
    table = pd.DataFrame(
        {
            "id": [p.photo_id for p in photos],
            "url": [urls[p.photo_id] for p in photos],
            "title": [quote_plus(p.title_text) for p in photos],
            "description": [quote_plus(p.description_text) for p in photos],
            "marker": [int(p.is_video) for p in photos],
        }
    )
    joined_csv, joined_parquet = root / "yfcc15m_joined.csv", root / "yfcc15m_joined.parquet"
    table.to_csv(joined_csv, index=False)
    table.to_parquet(joined_parquet, index=False)
    return YfccFixture(
        metadata_tsv,
        subset_tsv,
        joined_csv,
        joined_parquet,
        root / YFCC_MIRROR_DIR,
        columns,
        subset_ids,
        expected_captions={urls[p.photo_id]: set(p.kept) for p in photos if p.kept},
        expected_reasons=Counter(r for p in photos for r in p.reasons),
        n_subset_records=len(photos),
        malformed_lines=1,
        metadata_only_ids=[p.photo_id for p in outside],
    )


def write_yfcc_images(mirror_root: Path, photos: list[_YfccPhoto], seed: int) -> None:
    for photo in photos:
        if photo.image:
            rng = stream_rng(seed, 11, photo.photo_id)
            path = mirror_root / yfcc_relative_path(photo.photo_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(render_jpeg(sample_scene(rng), IMAGE_SETTINGS, rng))


# --- ShareGPT4V --------------------------------------------------------------------------

SHAREGPT4V_JSON = "share-captioner_coco_lcs_sam_1246k_1107.json"
COCO_CAPTIONS_JSON = "captions_train2017.json"
QUESTION = "<image>\nWhat do you see happening in this image?"


@dataclass
class ShareGPT4VRecordExpectation:
    image: str | None  # relative image path; None when the record has no usable one
    captions: dict[str, list[str]]  # origin -> kept captions
    reasons: list[str] = field(default_factory=list)


@dataclass
class ShareGPT4VFixture:
    json_path: Path
    coco_captions_json: Path
    image_root: Path
    records: list[ShareGPT4VRecordExpectation]  # one per JSON record, in file order

    def expected_captions(self, indices, image_root: str | None = None) -> dict[str, set[str]]:
        """source -> kept caption texts over the given record indices (images with >= 1).

        Sources are under image_root (default: the local image folder; pass the URI of a copy,
        e.g. on s3://, when the build reads the copy)."""
        root = (str(self.image_root) if image_root is None else image_root).rstrip("/")
        out = {}
        for i in indices:
            texts = {t for ts in self.records[i].captions.values() for t in ts}
            if texts:
                out[f"{root}/{self.records[i].image}"] = texts
        return out

    def expected_keys(self, indices, image_root: str | None = None) -> set[str]:
        return {sample_key(s) for s in self.expected_captions(indices, image_root)}

    def expected_reasons(self, indices) -> Counter:
        return Counter(r for i in indices for r in self.records[i].reasons)


def sharegpt4v_long_caption(scene, variant: int) -> tuple[str, str]:
    """(long caption as the GPT reply, its expected first sentence)."""
    first = long_caption(scene).rstrip(".") + "."
    if variant == 0:  # one sentence: no first-sentence caption
        return first, first
    if variant == 1:
        lead = f"In this photo by Mr. Smith, e.g. a 3.5 cm print, {first[0].lower()}{first[1:]}"
        return f"{lead}\n\nThe colours are vivid. Nothing else is visible.", lead
    return f"{first} It looks like a poster!\nThe edges are sharp.", first


def coco_caption_texts(scene, rng) -> list[str]:
    texts = short_captions(scene, rng)
    return [f"{texts[k % len(texts)]} number {k}" for k in range(5)]


def write_sharegpt4v_fixture(
    root: Path, n_records: int = 12, seed: int = 0, rules: CaptionRules = CaptionRules()
) -> ShareGPT4VFixture:
    """The ShareGPT4V JSON (n_records good records alternating COCO and SAM images; a malformed
    record at index 2 and the bad ones at the end), captions_train2017.json and the images."""
    root = Path(root)
    image_root = root / "images"
    records, expectations, coco_images, coco_annotations = [], [], [], []
    for i in range(n_records):
        rng = stream_rng(seed, 20, i)
        scene = sample_scene(rng)
        image = f"coco/train2017/{i:012d}.jpg" if i % 2 == 0 else f"sam/images/sa_{i}.jpg"
        write_image(image_root / image, scene, rng)
        reply, short = sharegpt4v_long_caption(scene, i % 3)
        captions = {"sharegpt4v": [clean(reply)]}
        if short != reply:
            captions["sharegpt4v-first-sentence"] = [short]
        if i % 2 == 0:
            texts = coco_caption_texts(scene, rng)
            coco_images.append({"id": i, "file_name": f"{i:012d}.jpg", "height": 48, "width": 48})
            coco_annotations += [{"image_id": i, "id": 100 * i + k, "caption": t} for k, t in enumerate(texts)]
            captions["coco"] = texts
        records.append(sharegpt4v_record(f"{i:012d}", image, reply))
        expectations.append(ShareGPT4VRecordExpectation(image, captions))
    add_bad_sharegpt4v_records(records, expectations, image_root, rules)
    coco = {"info": {}, "licenses": [], "images": coco_images, "annotations": interleave(coco_annotations)}
    json_path, coco_json = root / SHAREGPT4V_JSON, root / COCO_CAPTIONS_JSON
    json_path.write_text(json.dumps(records))
    coco_json.write_text(json.dumps(coco))
    return ShareGPT4VFixture(json_path, coco_json, image_root, expectations)


def add_bad_sharegpt4v_records(records, expectations, image_root: Path, rules: CaptionRules) -> None:
    ok_image = "sam/images/sa_bad.jpg"
    write_image(image_root / ok_image, sample_scene(stream_rng(0, 21)), stream_rng(0, 22))
    no_gpt = {"id": "x1", "image": ok_image, "conversations": [{"from": "human", "value": QUESTION}]}
    bad = [  # (index or None to append, record, image, reason)
        (min(2, len(records)), {"id": "x0", "conversations": []}, None, "malformed_record"),
        (None, no_gpt, ok_image, "malformed_record"),
        (None, sharegpt4v_record("x2", ok_image, None), ok_image, "malformed_record"),
        (None, sharegpt4v_record("x3", "../secret/sa_1.jpg", "a caption"), None, "bad_path"),
        (None, sharegpt4v_record("x4", "/etc/sa_1.jpg", "a caption"), None, "bad_path"),
        (None, sharegpt4v_record("x5", ok_image, " \n "), ok_image, "empty_caption"),
        (
            None,
            sharegpt4v_record("x6", ok_image, "A long one. " * rules.max_caption_chars),
            ok_image,
            "caption_too_long",
        ),
    ]
    for index, record, image, reason in bad:
        index = len(records) if index is None else index
        records.insert(index, record)
        expectations.insert(index, ShareGPT4VRecordExpectation(image, {}, [reason]))


def sharegpt4v_record(record_id: str, image: str, reply) -> dict:
    return {
        "id": record_id,
        "image": image,
        "conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": reply}],
    }


def clean(text: str) -> str:
    return " ".join(text.split())


def interleave(annotations: list[dict]) -> list[dict]:
    """Annotations in COCO's file order style: images interleaved, each image's order kept."""
    by_round = sorted(enumerate(annotations), key=lambda t: (t[1]["id"] % 100, t[0]))
    return [a for _, a in by_round]


def write_image(path: Path, scene, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render_jpeg(scene, IMAGE_SETTINGS, rng))
