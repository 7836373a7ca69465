"""CPU cost per training sample of our loader against OpenCLIP's own WebDataset pipeline, on
the same shards of photographs (stored with a 256 px short side, read at 224 px for ViT-B/16).

    python -m benchmarks.bench_loader [--samples 2048] [--batch-size 256] [--workdir bench_out]

The photographs are the colour pictures scikit-image ships (astronaut, coffee, chelsea, rocket,
retina, the Hubble deep field, a stained tissue, a motorcycle), each sample a random crop of one
(aspect 3:4 to 4:3, 30-100 % of its area) resized to a 256 px short side and JPEG-encoded at
quality 90, as img2dataset stores a corpus; captions of 8-20 words. Two builds of the same
samples: ours (jpg, edge.png, json, txt: what `pipelines/` writes) and the same tars without the
edge members (OpenCLIP's `pilrgb` decoder would otherwise decode those PNGs too).

* ours: `training.batches.BatchPreprocessor.prepare_rows` (what each Ray Data actor runs: JPEG
  decode with OpenCV, the joint random crop of image and edge map, the edge reduction per
  patch, the caption choice, tokenisation; images leave as uint8, normalised on the device),
  fed the tars' rows;
* OpenCLIP: `open_clip_train.data.get_wds_dataset` with open_clip's training transform
  (PIL decode, RandomResizedCrop, ToTensor, Normalize) and tokenizer, iterated in this process
  (`--workers 0`), its sample shuffle buffer included.

Both count the process's CPU time (every thread), one torch and one OpenCV thread each, over
the whole pass after one warm-up batch: core-milliseconds per sample, and the ratio.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import time
from pathlib import Path

import cv2
import numpy as np

from pipelines import shards
from pipelines.edges import compute_edge_png

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
)
WORDS = (
    "a",
    "photo",
    "of",
    "the",
    "red",
    "small",
    "old",
    "man",
    "cat",
    "cup",
    "rocket",
    "sky",
    "on",
    "table",
    "with",
    "blue",
    "light",
    "near",
    "city",
    "street",
    "tree",
    "dark",
    "bright",
    "view",
)
STORED_SHORT_SIDE, INPUT_SIZE, PATCH = 256, 224, 16


def photographs() -> list[np.ndarray]:
    import skimage.data

    out = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        out.append(image[0] if isinstance(image, tuple) else image)
    return out


def stored_sample(rng: np.random.Generator, photo: np.ndarray) -> bytes:
    """A random crop of a photograph at a 256 px short side, as a quality-90 JPEG."""
    h, w = photo.shape[:2]
    aspect, scale = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))), rng.uniform(0.3, 1.0)
    ch = int(min(h, np.sqrt(h * w * scale / aspect)))
    cw = int(min(w, ch * aspect))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = photo[top : top + ch, left : left + cw]
    factor = STORED_SHORT_SIDE / min(crop.shape[:2])
    size = (round(crop.shape[1] * factor), round(crop.shape[0] * factor))
    resized = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(resized, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return jpeg.tobytes()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng, photos = np.random.default_rng(seed), photographs()
    rows = []
    for i in range(n):
        jpeg = stored_sample(rng, photos[i % len(photos)])
        height, width = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        caption = " ".join(rng.choice(WORDS, int(rng.integers(8, 21))))
        meta = {
            "key": f"{i:08x}",
            "source": f"photo-{i}",
            "width": width,
            "height": height,
            "captions": [{"text": caption, "kind": shards.CAPTION_SHORT, "source": "synthetic"}],
        }
        rows.append(
            {
                shards.KEY: f"{i:08x}",
                shards.IMAGE: jpeg,
                shards.EDGE: compute_edge_png(jpeg),
                shards.META: json.dumps(meta),
            }
        )
    return rows


def write_tars(rows: list[dict], folder: Path, per_tar: int, with_edges: bool) -> list[str]:
    """Our tars (shards.encode_shard_tar), or the same members without `<key>.edge.png`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(rows), per_tar):
        data = shards.encode_shard_tar(rows[start : start + per_tar])
        if not with_edges:
            data = drop_members(data, shards.EXT_EDGE)
        path = folder / f"{start // per_tar:06d}.tar"
        path.write_bytes(data)
        paths.append(str(path))
    return paths


def drop_members(data: bytes, ext: str) -> bytes:
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data)) as src,
        tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst,
    ):
        for member in src:
            if not member.name.endswith("." + ext):
                dst.addfile(member, src.extractfile(member))
    return out.getvalue()


def cpu_ms_per_sample(batches, n_samples: int, warmup_samples: int) -> tuple[float, float]:
    """(CPU core-ms per sample, wall samples/s) over what follows the first batch."""
    it = iter(batches)
    next(it)
    cpu, wall, seen = time.process_time(), time.perf_counter(), 0
    for batch_size in it:
        seen += batch_size
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    expected = n_samples - warmup_samples
    if seen != expected:
        raise RuntimeError(f"the loader yielded {seen} samples after warm-up, expected {expected}")
    return 1e3 * cpu / seen, seen / wall


def ours(paths: list[str], batch_size: int):
    from training.batches import EPOCH, IMAGES, BatchPreprocessor
    from training.config import DataConfig

    prepare = BatchPreprocessor("ViT-B-16", INPUT_SIZE, PATCH, DataConfig().crop_scale, seed=0)  # open_clip's
    for path in paths:
        rows = [{**r, EPOCH: 0} for r in shards.iter_tar_samples(Path(path).read_bytes())]
        for start in range(0, len(rows), batch_size):
            yield len(prepare.prepare_rows(rows[start : start + batch_size])[IMAGES])


def open_clips(paths: list[str], batch_size: int, n_samples: int):
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = argparse.Namespace(
        train_data="::".join(paths),
        train_num_samples=n_samples,
        dataset_resampled=False,
        batch_size=batch_size,
        workers=0,
        world_size=1,
        seed=0,
        train_data_upsampling_factors=None,
        val_data=None,
        val_num_samples=None,
    )
    preprocess = open_clip.image_transform(INPUT_SIZE, is_train=True)
    loader = get_wds_dataset(
        args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer("ViT-B-16")
    ).dataloader
    for images, _ in loader:
        yield len(images)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--per-tar", type=int, default=512)
    p.add_argument("--workdir", default="bench_out/loader")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    workdir = Path(args.workdir)
    rows = make_rows(args.samples)
    ours_tars = write_tars(rows, workdir / "ours", args.per_tar, with_edges=True)
    theirs_tars = write_tars(rows, workdir / "no_edges", args.per_tar, with_edges=False)
    mean_bytes = np.mean([len(r[shards.IMAGE]) for r in rows])
    print(
        f"{args.samples} photographs, {STORED_SHORT_SIDE} px short side stored (mean JPEG "
        f"{mean_bytes / 1024:.1f} KiB) -> {INPUT_SIZE} px, batches of {args.batch_size}, 1 core",
        flush=True,
    )
    ours_ms, ours_rate = cpu_ms_per_sample(ours(ours_tars, args.batch_size), args.samples, args.batch_size)
    theirs_ms, theirs_rate = cpu_ms_per_sample(
        open_clips(theirs_tars, args.batch_size, args.samples), args.samples, args.batch_size
    )
    print(
        f"ours (OpenCV decode, joint crop + edge scores, caption, tokens; uint8 out): "
        f"{ours_ms:6.2f} core-ms/sample  ({ours_rate:7.1f} samples/s on one core)"
    )
    print(
        f"OpenCLIP (open_clip_train.data webdataset, PIL + torchvision, tokens; float out): "
        f"{theirs_ms:6.2f} core-ms/sample  ({theirs_rate:7.1f} samples/s on one core)"
    )
    print(
        f"ours / OpenCLIP CPU per sample: {ours_ms / theirs_ms:.2f}x; at 3,200 samples/s per H100 an 8-GPU "
        f"node needs {25_600 * ours_ms / 1e3:.0f} cores of ours, {25_600 * theirs_ms / 1e3:.0f} of OpenCLIP's"
    )
    return {"ours_ms": ours_ms, "open_clip_ms": theirs_ms, "ratio": ours_ms / theirs_ms}


if __name__ == "__main__":
    main()
