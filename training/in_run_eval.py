"""In-run evaluation (`eval.every`, `eval.sets`; off by default): zero-shot accuracy and
image-text retrieval recall on small named sets while a run trains, logged as
eval/<set>/<metric> beside the losses (metrics.jsonl, TensorBoard, W&B).

The sets are read by the evaluation job's readers and scored by its functions (`scoring/`:
class prompts, the topology's class scores and similarity, CLIP_benchmark's top-k and
recall@k), with the preprocessing and tokenizer a checkpoint of this run gets in the
evaluation job (`training/inference.py`), so a figure logged at step k is the one
`evaluation/evaluate.py` reports for that step's checkpoint (a test holds them equal).

Every worker takes part: worker r embeds items r, r + W, ... of each set (padded to one count,
so that every worker runs the same forwards, which FSDP's gathers need), the embeddings are
all-gathered and every worker scores them; rank 0's tracker logs them. Images are decoded and
preprocessed once, when the evaluator is built; each worker keeps only its share."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist

from scoring.retrieval import compute_retrieval_recall, retrieval_scores
from scoring.sets import SET_READERS, TEMPLATED, ClassificationSet, RetrievalSet
from scoring.sets.files import read_image
from scoring.zeroshot import class_logits, class_prompts, classification_metrics
from training.checkpoint import unwrap
from training.collectives import gather_strided
from training.config import EvalConfig
from training.inference import EvalPreprocess
from training.sharding import is_sharded

PREFIX = "eval/{name}/{metric}"


@dataclasses.dataclass(frozen=True)
class SetSpec:
    name: str
    format: str
    path: str


def parse_set(text: str) -> SetSpec:
    """ "NAME=FORMAT:PATH" (PATH may itself hold ':', as s3:// does)."""
    name, sep, rest = text.partition("=")
    fmt, colon, path = rest.partition(":")
    if not (sep and colon and name and path):
        raise ValueError(f"eval.sets entry {text!r}: expected NAME=FORMAT:PATH, e.g. pets=image_folder:/data/pets/test")
    if fmt not in SET_READERS:
        raise ValueError(f"eval.sets entry {text!r}: unknown format {fmt!r}; known: {sorted(SET_READERS)}")
    return SetSpec(name, fmt, path)


def check_eval_config(config: EvalConfig) -> list[SetSpec]:
    """The parsed sets; an error for sets without a period or a period without sets."""
    specs = [parse_set(s) for s in config.sets]
    if config.every < 0 or config.batch_size < 1:
        raise ValueError(f"eval.every must be >= 0 and eval.batch_size >= 1, got {config.every}, {config.batch_size}")
    if bool(specs) != bool(config.every):
        raise ValueError("in-run evaluation needs both eval.every (> 0) and eval.sets")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.sets names repeat: {names}")
    return specs


def load_set(spec: SetSpec) -> ClassificationSet | RetrievalSet:
    reader = SET_READERS[spec.format]
    dataset = reader(spec.path, need_templates=True) if spec.format in TEMPLATED else reader(spec.path)
    return dataclasses.replace(dataset, name=spec.name)


def share(items: list, rank: int, world: int) -> list:
    """Worker `rank`'s round-robin share of `items`, padded with its last item (or the set's
    first) to ceil(n / W), the count every worker embeds."""
    mine = items[rank::world]
    count = math.ceil(len(items) / world)
    return mine + [(mine or items)[-1]] * (count - len(mine))


class EvalSet:
    """One set, preprocessed for this worker: its image tensors and tokenised texts (its
    share of each), and how to score the gathered embeddings."""

    def __init__(self, spec: SetSpec, preprocess: EvalPreprocess, tokenizer, rank: int, world: int):
        self.dataset = load_set(spec)
        self.zeroshot = isinstance(self.dataset, ClassificationSet)
        texts = class_prompts(self.dataset) if self.zeroshot else list(self.dataset.captions)
        images = [ref if isinstance(ref, bytes) else read_image(ref) for ref in share(self.dataset.images, rank, world)]
        self.images = torch.stack([preprocess(image) for image in images])
        self.texts = tokenizer(share(texts, rank, world))
        self.n_images = len(self.dataset.images)
        self.n_texts = len(texts)

    def score(self, image_features: np.ndarray, text_features: np.ndarray, topology) -> dict[str, float]:
        if self.zeroshot:
            return classification_metrics(
                self.dataset, class_logits(self.dataset, image_features, text_features, topology)
            )
        scores = retrieval_scores(image_features, text_features, topology)
        return compute_retrieval_recall(scores, self.dataset.text_to_image)


def embed(encode, inputs: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    return torch.cat([encode(inputs[s : s + batch_size].to(device)).float() for s in range(0, len(inputs), batch_size)])


def broadcast_buffers(model) -> None:
    """Rank 0's buffers on every worker. DDP copies them from rank 0 at the start of each
    forward, so after a step every other worker holds the batch-norm statistics of its own
    last batch (ResNet towers); the checkpoint, and so the evaluation job, has rank 0's."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)


@contextlib.contextmanager
def evaluation_mode(model):
    """No gradients, eval-mode modules with rank 0's buffers, and under FSDP the root unit's
    parameters gathered (the blocks gather their own around each forward); training mode
    restored after."""
    was_training = model.training
    broadcast_buffers(model)
    model.eval()
    sharded = is_sharded(model)
    if sharded:
        model.unshard()
    try:
        with torch.no_grad():
            yield
    finally:
        if sharded:
            model.reshard()
        model.train(was_training)


class InRunEvaluator:
    """`evaluator(model)` -> {"eval/<set>/<metric>": value} for the current weights; called on
    every worker at the same steps (training/loop.py)."""

    def __init__(
        self,
        config: EvalConfig,
        image_size: int,
        tokenizer,
        rank: int,
        world: int,
        device: torch.device,
        autocast: bool = False,
    ):
        preprocess = EvalPreprocess(image_size)
        self.sets = [EvalSet(spec, preprocess, tokenizer, rank, world) for spec in check_eval_config(config)]
        self.batch_size = config.batch_size
        self.device = device
        self.autocast = autocast

    def __call__(self, model) -> dict[str, float]:
        inner = unwrap(model)
        metrics = {}
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)
        with evaluation_mode(inner), autocast:
            for part in self.sets:
                images = gather_strided(
                    embed(inner.embed_image, part.images, self.batch_size, self.device), part.n_images
                )
                texts = gather_strided(embed(inner.embed_text, part.texts, self.batch_size, self.device), part.n_texts)
                scored = part.score(images.cpu().numpy(), texts.cpu().numpy(), inner.topology)
                metrics.update({PREFIX.format(name=part.dataset.name, metric=k): v for k, v in scored.items()})
        return metrics
