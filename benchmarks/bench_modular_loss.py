"""SmartCLIP's modular loss (two matrix products, training/methods/smartclip/loss.py) against the CLIP
loss and against the naive per-pair form that materialises z_I^a ⊙ m_b for every pair
(a B x B x d tensor): forward + backward time and memory.

    python benchmarks/bench_modular_loss.py [--device cuda] [--batches 256 1024 4096] [--dims 512 768]

Memory: on CUDA, peak allocated bytes during forward + backward (torch.cuda.max_memory_allocated,
minus what was allocated before). On CPU, the bytes of every tensor autograd saves for the
backward pass (measured with torch.autograd.graph.saved_tensors_hooks, de-duplicated by
storage) — the activation memory a loss holds between forward and backward; plus the
analytic size of the largest intermediate. The naive form runs only where its B x B x d
tensor stays under --naive-max-gib.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from training.methods.clip.loss import ContrastiveLoss  # noqa: E402
from training.methods.smartclip.loss import EPS, ModularContrastiveLoss  # noqa: E402

SCALE = 100.0


def naive_modular_loss(outputs: dict) -> dict:
    """Per pair, vectorised: masked images (B, B, d), their cosines with every text."""
    image, text, masks = outputs["image_features"], outputs["text_features"], outputs["text_masks"]
    masked = image[:, None, :] * masks[None, :, :]  # (B, B, d): image a under text b's mask
    cosine = (masked * text[None]).sum(-1) / torch.sqrt((masked * masked).sum(-1) + EPS)  # (B, B)
    logits = outputs["logit_scale"] * cosine
    labels = torch.arange(image.shape[0], device=image.device)
    return {"align": F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)}


def make_outputs(batch: int, dim: int, device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    image = torch.randn(batch, dim, device=device, generator=g).requires_grad_(True)
    text = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).requires_grad_(True)
    masks = (torch.rand(batch, dim, device=device, generator=g) < 0.7).float().requires_grad_(True)
    return {
        "image_features": image,
        "text_features": text,
        "text_masks": masks,
        "logit_scale": torch.tensor(SCALE, device=device),
    }


def run_once(loss_fn, outputs: dict) -> None:
    inputs = dict(outputs)
    if loss_fn.__class__ is ContrastiveLoss:  # CLIP sees unit image features and no masks
        inputs["image_features"] = F.normalize(outputs["image_features"], dim=-1)
    sum(loss_fn(inputs).values()).backward()


def measure_saved_bytes(loss_fn, outputs: dict) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run_once(loss_fn, outputs)
    return sum(storages.values())


def measure(loss_fn, batch: int, dim: int, device: str, repeats: int) -> tuple[float, int]:
    """(fastest of `repeats` forward + backward passes in seconds — the least disturbed one on
    a shared machine —, memory bytes as described in the docstring)."""
    outputs = make_outputs(batch, dim, device)
    run_once(loss_fn, outputs)  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_once(loss_fn, outputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        for t in outputs.values():
            t.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_once(loss_fn, outputs)
        torch.cuda.synchronize()
        memory = torch.cuda.max_memory_allocated() - base
    else:
        memory = measure_saved_bytes(loss_fn, outputs)
    return min(times), memory


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 768])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (a shared CPU: OpenMP threads waiting on each other distort small ops)",
    )
    p.add_argument("--naive-max-gib", type=float, default=1.0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    memory_kind = "peak allocated" if args.device == "cuda" else "saved for backward"
    print(
        f"device {args.device}, {torch.get_num_threads()} threads; memory = {memory_kind} (MiB); "
        "times = fastest forward + backward of --repeats (ms)"
    )
    print(
        f"{'B':>5} {'d':>4} | {'CLIP ms':>9} {'MiB':>8} | {'modular ms':>10} {'MiB':>8} | "
        f"{'naive ms':>9} {'MiB':>8} | {'B*B*d MiB':>9} | mod/CLIP time  naive/mod time"
    )
    losses = {"clip": ContrastiveLoss(), "modular": ModularContrastiveLoss(1.0, 0.01)}
    for batch in args.batches:
        for dim in args.dims:
            row = {name: measure(fn, batch, dim, args.device, args.repeats) for name, fn in losses.items()}
            cube_bytes = batch * batch * dim * 4
            if cube_bytes <= args.naive_max_gib * 2**30:
                row["naive"] = measure(naive_modular_loss, batch, dim, args.device, args.repeats)
            naive = row.get("naive")
            naive_text = f"{naive[0] * 1e3:9.1f} {naive[1] / 2**20:8.1f}" if naive else f"{'skipped':>9} {'-':>8}"
            ratio = f"{naive[0] / row['modular'][0]:14.1f}" if naive else f"{'-':>14}"
            print(
                f"{batch:>5} {dim:>4} | {row['clip'][0] * 1e3:9.1f} {row['clip'][1] / 2**20:8.1f} | "
                f"{row['modular'][0] * 1e3:10.1f} {row['modular'][1] / 2**20:8.1f} | {naive_text} | "
                f"{cube_bytes / 2**20:9.0f} | {row['modular'][0] / row['clip'][0]:13.2f} {ratio}"
            )


if __name__ == "__main__":
    main()
