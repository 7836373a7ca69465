"""Seeded generator of a small compositional image-caption corpus: coloured shapes on backgrounds.

It writes the training images that the loopback mirror serves, their short and long captions, a
CC12M-style TSV list of them, and a held-out evaluation split (zero-shot classes, Karpathy
retrieval, Urban1k long captions). Run: `python -m pipelines.demo_corpus --out demo_out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well separated hues; backgrounds below stay (nearly) neutral so no object
# colour ever matches its background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (125, 45, 175),
    "orange": (245, 130, 25),
    "cyan": (35, 205, 215),
    "pink": (245, 120, 190),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Object side as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.24, "large": 0.32}
SIZE_JITTER = 0.015
COLOUR_JITTER = 12
# Position name -> (row, column) of its cell in a 3x3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
POSITION_PHRASES: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
# Largest shift of an object's centre from its cell centre, as a fraction of the image side.
MAX_CENTRE_JITTER = 0.04
BACKGROUND_PHRASES: dict[str, str] = {
    "grey": "a grey background",
    "beige": "a beige background",
    "gradient": "a gradient background",
    "striped": "a striped background",
    "noisy": "a noisy background",
}
BACKGROUNDS: tuple[str, ...] = tuple(BACKGROUND_PHRASES)
MAX_OBJECTS = 4
# Backgrounds keep to mid lightness so both dark (blue, purple) and light (yellow, cyan)
# objects stand out.
BACKGROUND_LIGHTNESS = (70.0, 200.0)
BEIGE_LIGHTNESS = (140.0, 210.0)  # darker "beige" reads as brown
BEIGE_TINT = np.array([14.0, 5.0, -14.0])

MIN_SHORT_CAPTIONS = 2
MAX_SHORT_CAPTIONS = 4
MAX_CAPTION_ATTEMPTS = 64
SHORT_CAPTION_FRAMES: tuple[str, ...] = (
    "{objects}",
    "there is {objects}",
    "an image of {objects}",
    "{objects} on {background}",
)
# Chance that a short caption adds the size / the position of each object it names.
SHORT_SIZE_PROBABILITY = 0.35
SHORT_POSITION_PROBABILITY = 0.35

ZEROSHOT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c}.",
    "a {c}.",
    "an image of a {c}.",
    "a {c} on a background.",
)

# corpus.jsonl fields.
FIELD_PATH = "path"
FIELD_SHORT_CAPTIONS = "short_captions"
FIELD_LONG_CAPTION = "long_caption"
FIELD_OBJECTS = "objects"
FIELD_BACKGROUND = "background"
FIELD_LABEL = "label"  # zero-shot scenes.jsonl
FIELD_CLASSNAME = "classname"

# Layout under out_dir (the mirror serves MIRROR_DIR; URLs are relative to it).
MIRROR_DIR = "mirror"
IMAGES_DIR = "images"
CORRUPT_DIR = "corrupt"
CORPUS_JSONL = "corpus.jsonl"
ZEROSHOT_DIR = "eval/zeroshot"
RETRIEVAL_DIR = "eval/retrieval"
LONG_DIR = "eval/long"
CLASSNAMES_TXT = "classnames.txt"
# Attribute name -> its value for each class in classnames.txt order: evaluation reports the
# accuracy of each attribute of the top-1 class (colour, shape) beside top-1 itself.
CLASS_ATTRIBUTES_JSON = "class_attributes.json"
TEMPLATES_TXT = "templates.txt"
SCENES_JSONL = "scenes.jsonl"
KARPATHY_JSON = "dataset_karpathy.json"
KARPATHY_DATASET_NAME = "demo"
TRUNCATED_JPEG_BYTES = 200
CORRUPT_FILES = ("000000.jpg", "000001.jpg", "000002.jpg")  # truncated JPEG, text, empty
DEAD_ROW_CAPTION = "an image that is no longer online"
CORRUPT_ROW_CAPTION = "an image file that does not decode"

# Independent random streams, so the evaluation split never reuses training draws and
# each image depends only on (seed, stream, index).
TRAIN_STREAM = 0
ZEROSHOT_STREAM = 1
RETRIEVAL_STREAM = 2
TSV_STREAM = 3
CORRUPT_STREAM = 4
MAX_SCENE_ATTEMPTS = 1000


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def class_name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # in reading order of their cells


@dataclass(frozen=True)
class DemoCorpus:
    out_dir: Path
    mirror_root: Path
    images_dir: Path
    corrupt_paths: tuple[Path, ...]
    corpus_jsonl: Path
    zeroshot_dir: Path
    retrieval_dir: Path
    long_dir: Path
    n_images: int
    seed: int


def stream_rng(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, stream, index])


def class_names() -> list[str]:
    """All colour x shape classes, colour-major: class i is line i of classnames.txt."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def class_attributes() -> dict[str, list[str]]:
    """{"colour": [...], "shape": [...]}: each class's attribute values, in class_names() order."""
    return {
        "colour": [colour for colour in COLOURS for _ in SHAPES],
        "shape": [shape for _ in COLOURS for shape in SHAPES],
    }


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A background and 1..MAX_OBJECTS objects, in distinct cells and of distinct classes."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    if not 1 <= n <= len(POSITIONS):
        raise ValueError(f"n_objects must be in 1..{len(POSITIONS)}, got {n}")
    background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    # Distinct classes keep captions unambiguous ("the red circle" names exactly one object).
    classes = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    sizes = rng.integers(len(SIZES), size=n)
    colours = list(COLOURS)
    positions = list(POSITIONS)
    size_names = list(SIZES)
    objects = [
        SceneObject(colours[c // len(SHAPES)], SHAPES[c % len(SHAPES)], size_names[s], positions[p])
        for c, p, s in sorted(zip(classes, cells, sizes), key=lambda t: t[1])
    ]
    return Scene(background, tuple(objects))


def sample_class_scene(rng: np.random.Generator, class_index: int) -> Scene:
    """A single-object scene of one colour x shape class (for zero-shot evaluation)."""
    scene = sample_scene(rng, n_objects=1)
    colour = list(COLOURS)[class_index // len(SHAPES)]
    shape = SHAPES[class_index % len(SHAPES)]
    return replace(scene, objects=(replace(scene.objects[0], colour=colour, shape=shape),))


def scene_key(scene: Scene) -> tuple:
    """What captions can tell apart: two scenes with one key get identical long captions."""
    return scene.background, frozenset(scene.objects)


# --- rendering ---------------------------------------------------------------------------


def paint_grey(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.full((size, size, 3), rng.uniform(*BACKGROUND_LIGHTNESS))


def paint_beige(size: int, rng: np.random.Generator) -> np.ndarray:
    return np.full((size, size, 3), rng.uniform(*BEIGE_LIGHTNESS)) + BEIGE_TINT


def paint_gradient(size: int, rng: np.random.Generator) -> np.ndarray:
    low, high = BACKGROUND_LIGHTNESS
    start = rng.uniform(low, high)
    end = np.clip(start + rng.choice([-1, 1]) * rng.uniform(50, 100), low - 30, high + 30)
    ramp = np.linspace(start, end, size)
    grid = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]  # vertical or horizontal
    return np.repeat(np.broadcast_to(grid, (size, size))[..., None], 3, axis=2)


def paint_stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    base = rng.uniform(*BACKGROUND_LIGHTNESS)
    other = base + rng.choice([-1, 1]) * rng.uniform(25, 50)
    half_period = int(rng.integers(max(2, size // 32), max(3, size // 10) + 1))
    coords = np.arange(size) // half_period % 2
    grid = coords[:, None] if rng.random() < 0.5 else coords[None, :]
    stripes = np.where(np.broadcast_to(grid, (size, size)) == 1, other, base)
    return np.repeat(stripes[..., None], 3, axis=2)


def paint_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    # Same noise on all channels: it varies lightness only, never hue.
    noise = rng.normal(0.0, 12.0, (size, size))
    return np.repeat((rng.uniform(*BACKGROUND_LIGHTNESS) + noise)[..., None], 3, axis=2)


BACKGROUND_PAINTERS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "grey": paint_grey,
    "beige": paint_beige,
    "gradient": paint_gradient,
    "striped": paint_stripes,
    "noisy": paint_noise,
}


def polygon_points(cx: float, cy: float, radii: Iterable[float]) -> list[tuple[float, float]]:
    """Vertices at equal angles starting straight up, one per radius (alternate radii: a star)."""
    radii = list(radii)
    angles = [-math.pi / 2 + 2 * math.pi * k / len(radii) for k in range(len(radii))]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """One shape fitting the square of half-side r centred on (cx, cy)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - 0.9 * r, cy - 0.9 * r, cx + 0.9 * r, cy + 0.9 * r), fill=fill)
    elif shape == "triangle":
        # A circumradius of 1.15 r spans 2 r across; shifting by R/4 centres it vertically.
        big_r = 1.15 * r
        draw.polygon(polygon_points(cx, cy + big_r / 4, [big_r] * 3), fill=fill)
    elif shape == "star":
        draw.polygon(polygon_points(cx, cy + 0.1 * r, [1.05 * r, 0.45 * r] * 5), fill=fill)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int, rng: np.random.Generator) -> None:
    side = (SIZES[obj.size] + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * image_size
    cell = image_size / 3
    # Jitter no further than the object's slack in its cell, so objects never overlap.
    jitter = min(MAX_CENTRE_JITTER * image_size, max(0.0, (cell - side) / 2))
    row, col = POSITIONS[obj.position]
    cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter)
    cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter)
    tint = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    fill = tuple(int(v) for v in np.clip(np.array(COLOURS[obj.colour]) + tint, 0, 255))
    draw_shape(draw, obj.shape, cx, cy, side / 2, fill)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image; rng supplies the nuisance details captions do not mention."""
    canvas = BACKGROUND_PAINTERS[scene.background](image_size, rng)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        draw_object(draw, obj, image_size, rng)
    return image


# --- captions ----------------------------------------------------------------------------


def with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def describe_object(obj: SceneObject, *, with_size: bool, with_position: bool) -> str:
    """'a red circle', 'a small red circle', 'a red circle on the left', ..."""
    words = f"{obj.size} {obj.class_name}" if with_size else obj.class_name
    phrase = with_article(words)
    return f"{phrase} {POSITION_PHRASES[obj.position]}" if with_position else phrase


def join_phrases(phrases: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"


def compose_short_caption(scene: Scene, rng: np.random.Generator) -> str:
    """One short caption naming a random strict subset of the objects (the object, if alone)."""
    n = len(scene.objects)
    n_named = int(rng.integers(1, max(1, n - 1) + 1))
    named = [scene.objects[i] for i in rng.choice(n, size=n_named, replace=False)]
    with_size = bool(rng.random() < SHORT_SIZE_PROBABILITY)
    with_position = bool(rng.random() < SHORT_POSITION_PROBABILITY)
    phrases = [describe_object(o, with_size=with_size, with_position=with_position) for o in named]
    frame = SHORT_CAPTION_FRAMES[rng.integers(len(SHORT_CAPTION_FRAMES))]
    background = BACKGROUND_PHRASES[scene.background]
    return frame.format(objects=join_phrases(phrases), background=background)


def short_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """2 to 4 distinct short captions, each naming only some of the objects."""
    n_wanted = int(rng.integers(MIN_SHORT_CAPTIONS, MAX_SHORT_CAPTIONS + 1))
    captions: list[str] = []
    for _ in range(MAX_CAPTION_ATTEMPTS):
        caption = compose_short_caption(scene, rng)
        if caption not in captions:
            captions.append(caption)
        if len(captions) == n_wanted:
            break
    return captions


def long_caption(scene: Scene) -> str:
    """Every object with size, colour, shape and position, and the background, in one sentence."""
    phrases = [describe_object(o, with_size=True, with_position=True) for o in scene.objects]
    background = BACKGROUND_PHRASES[scene.background]
    return f"{background[0].upper()}{background[1:]} with {join_phrases(phrases)}."


def caption_tokens(caption: str) -> list[str]:
    """Lower-cased words, as in the 'tokens' field of Karpathy's split files."""
    return re.findall(r"[a-z0-9]+", caption.lower())


def scene_record(scene: Scene) -> dict:
    return {FIELD_BACKGROUND: scene.background, FIELD_OBJECTS: [asdict(o) for o in scene.objects]}


# --- writing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSettings:
    image_size: int
    jpeg_quality: int


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def render_jpeg(scene: Scene, settings: ImageSettings, rng: np.random.Generator) -> bytes:
    return encode_jpeg(render_scene(scene, settings.image_size, rng), settings.jpeg_quality)


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")


def write_training_split(
    mirror_root: Path, corpus_jsonl: Path, n_images: int, settings: ImageSettings, seed: int
) -> list[Scene]:
    """Training images under the mirror root and one corpus.jsonl line per image."""
    records = []
    scenes = []
    for i in range(n_images):
        rng = stream_rng(seed, TRAIN_STREAM, i)
        scene = sample_scene(rng)
        relative = f"{IMAGES_DIR}/{i:06d}.jpg"
        write_bytes(mirror_root / relative, render_jpeg(scene, settings, rng))
        records.append(
            json.dumps(
                {
                    FIELD_PATH: relative,
                    FIELD_SHORT_CAPTIONS: short_captions(scene, rng),
                    FIELD_LONG_CAPTION: long_caption(scene),
                    **scene_record(scene),
                }
            )
        )
        scenes.append(scene)
    write_lines(corpus_jsonl, records)
    return scenes


def write_corrupt_files(corrupt_dir: Path, settings: ImageSettings, seed: int) -> tuple[Path, ...]:
    """Bad rows for the downloader: a JPEG cut after its header, a text file, an empty file."""
    rng = stream_rng(seed, CORRUPT_STREAM)
    jpeg = render_jpeg(sample_scene(rng), settings, rng)
    contents = (jpeg[:TRUNCATED_JPEG_BYTES], b"this is not an image\n", b"")
    paths = tuple(corrupt_dir / name for name in CORRUPT_FILES)
    for path, data in zip(paths, contents):
        write_bytes(path, data)
    return paths


def write_zeroshot_split(zeroshot_dir: Path, n_per_class: int, settings: ImageSettings, seed: int) -> None:
    """An ImageFolder of single-object images, one zero-padded folder per class index."""
    records = []
    for class_index, name in enumerate(class_names()):
        for j in range(n_per_class):
            rng = stream_rng(seed, ZEROSHOT_STREAM, class_index * n_per_class + j)
            scene = sample_class_scene(rng, class_index)
            relative = f"{class_index:03d}/{j:04d}.jpg"
            write_bytes(zeroshot_dir / relative, render_jpeg(scene, settings, rng))
            records.append(
                json.dumps(
                    {FIELD_PATH: relative, FIELD_LABEL: class_index, FIELD_CLASSNAME: name, **scene_record(scene)}
                )
            )
    write_lines(zeroshot_dir / CLASSNAMES_TXT, class_names())
    write_lines(zeroshot_dir / TEMPLATES_TXT, ZEROSHOT_TEMPLATES)
    write_lines(zeroshot_dir / SCENES_JSONL, records)
    write_bytes(zeroshot_dir / CLASS_ATTRIBUTES_JSON, json.dumps(class_attributes()).encode("utf-8"))


def sample_unseen_scene(rng: np.random.Generator, seen: set) -> Scene:
    """A scene whose captions differ from every scene in `seen` (training and earlier eval)."""
    for _ in range(MAX_SCENE_ATTEMPTS):
        scene = sample_scene(rng)
        if scene_key(scene) not in seen:
            return scene
    raise RuntimeError("no unseen scene left: too many images for the vocabulary")


def karpathy_entry(imgid: int, filename: str, captions: list[str], first_sentid: int) -> dict:
    sentids = list(range(first_sentid, first_sentid + len(captions)))
    sentences = [
        {"raw": raw, "tokens": caption_tokens(raw), "imgid": imgid, "sentid": sentid}
        for raw, sentid in zip(captions, sentids)
    ]
    return {
        "filename": filename,
        "filepath": IMAGES_DIR,
        "split": "test",
        "imgid": imgid,
        "sentids": sentids,
        "sentences": sentences,
    }


def write_retrieval_image(retrieval_dir: Path, long_dir: Path, i: int, scene: Scene, jpeg: bytes) -> None:
    """Image i of both retrieval layouts; Urban1k pairs image/N.jpg with caption/N.txt from N=1."""
    write_bytes(retrieval_dir / IMAGES_DIR / f"{i:05d}.jpg", jpeg)
    write_bytes(long_dir / "image" / f"{i + 1}.jpg", jpeg)
    write_lines(long_dir / "caption" / f"{i + 1}.txt", [long_caption(scene)])


def write_retrieval_splits(
    retrieval_dir: Path, long_dir: Path, n_images: int, settings: ImageSettings, seed: int, training_scenes: list[Scene]
) -> None:
    """Held-out images for Karpathy short-caption and Urban1k long-caption retrieval."""
    seen = {scene_key(s) for s in training_scenes}
    entries = []
    records = []
    first_sentid = 0
    for i in range(n_images):
        rng = stream_rng(seed, RETRIEVAL_STREAM, i)
        scene = sample_unseen_scene(rng, seen)
        seen.add(scene_key(scene))  # no two held-out images share a long caption either
        write_retrieval_image(retrieval_dir, long_dir, i, scene, render_jpeg(scene, settings, rng))
        shorts = short_captions(scene, rng)
        entries.append(karpathy_entry(i, f"{i:05d}.jpg", shorts, first_sentid))
        records.append(json.dumps({FIELD_PATH: f"{IMAGES_DIR}/{i:05d}.jpg", **scene_record(scene)}))
        first_sentid += len(shorts)
    karpathy = {"images": entries, "dataset": KARPATHY_DATASET_NAME}
    write_bytes(retrieval_dir / KARPATHY_JSON, json.dumps(karpathy).encode("utf-8"))
    write_lines(retrieval_dir / SCENES_JSONL, records)


def write_demo_corpus(
    out_dir: str | Path,
    *,
    n_images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    n_eval_per_class: int = 8,
    n_eval_retrieval: int = 200,
    jpeg_quality: int = 95,
) -> DemoCorpus:
    """Write the whole corpus under out_dir; the same arguments give the same bytes."""
    out = Path(out_dir)
    settings = ImageSettings(image_size, jpeg_quality)
    mirror_root = out / MIRROR_DIR
    corpus = DemoCorpus(
        out_dir=out,
        mirror_root=mirror_root,
        images_dir=mirror_root / IMAGES_DIR,
        corrupt_paths=write_corrupt_files(mirror_root / CORRUPT_DIR, settings, seed),
        corpus_jsonl=out / CORPUS_JSONL,
        zeroshot_dir=out / ZEROSHOT_DIR,
        retrieval_dir=out / RETRIEVAL_DIR,
        long_dir=out / LONG_DIR,
        n_images=n_images,
        seed=seed,
    )
    scenes = write_training_split(mirror_root, corpus.corpus_jsonl, n_images, settings, seed)
    write_zeroshot_split(corpus.zeroshot_dir, n_eval_per_class, settings, seed)
    write_retrieval_splits(corpus.retrieval_dir, corpus.long_dir, n_eval_retrieval, settings, seed, scenes)
    return corpus


# --- CC12M-style list --------------------------------------------------------------------


def read_corpus_records(corpus_jsonl: Path) -> list[dict]:
    with open(corpus_jsonl, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def clean_tsv_field(text: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", text).strip()


def build_tsv_rows(corpus: DemoCorpus, base_url: str, n_dead: int, n_corrupt: int) -> list[tuple[str, str]]:
    """One (url, caption) row per caption of every image, plus rows that must fail to download."""
    base = base_url.rstrip("/")
    rows = []
    for record in read_corpus_records(corpus.corpus_jsonl):
        url = f"{base}/{record[FIELD_PATH]}"
        for caption in [*record[FIELD_SHORT_CAPTIONS], record[FIELD_LONG_CAPTION]]:
            rows.append((url, clean_tsv_field(caption)))
    # Indices past the last image are never written, so the mirror answers 404.
    dead = [f"{IMAGES_DIR}/{corpus.n_images + k:06d}.jpg" for k in range(n_dead)]
    rows += [(f"{base}/{relative}", DEAD_ROW_CAPTION) for relative in dead]
    corrupt = [corpus.corrupt_paths[k % len(corpus.corrupt_paths)] for k in range(n_corrupt)]
    rows += [(f"{base}/{p.relative_to(corpus.mirror_root).as_posix()}", CORRUPT_ROW_CAPTION) for p in corrupt]
    return rows


def write_cc12m_tsv(
    corpus: DemoCorpus,
    base_url: str,
    out_path: str | Path,
    *,
    n_dead: int = 1,
    n_corrupt: int = 2,
    header: bool = False,
) -> Path:
    """CC12M's `url<TAB>caption` rows, shuffled as in the real file (one image's rows apart)."""
    rows = build_tsv_rows(corpus, base_url, n_dead, n_corrupt)
    order = stream_rng(corpus.seed, TSV_STREAM).permutation(len(rows))
    lines = (["url\tcaption"] if header else []) + [f"{rows[i][0]}\t{rows[i][1]}" for i in order]
    out = Path(out_path)
    write_lines(out, lines)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = write_demo_corpus(args.out, n_images=args.n_images, image_size=args.image_size, seed=args.seed)
    for name, value in asdict(corpus).items():
        print(f"{name}: {value}")


def render_demo_samples(count: int, size: int = 128, seed: int = 0) -> list[np.ndarray]:
    """(size, size, 3) uint8 RGB demo scenes (coloured shapes on textured backgrounds)."""
    rng = np.random.default_rng(seed)
    return [np.asarray(render_scene(sample_scene(rng), size, rng).convert("RGB")) for _ in range(count)]


if __name__ == "__main__":
    main()
