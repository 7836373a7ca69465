"""The geometry of the embedding space (Design of the topology for contrastive
visual-textual alignment; docs/methods/topology.md): one object, named in the config (`topology`
section) and saved with every checkpoint, owns

  (a) how a tower's raw output becomes the embedding (`embed`: L2, per-chunk L2 or none),
  (b) the batch logits between two embedding sets (`logits`, training),
  (c) the class embedding from prompt templates (`class_embeddings` / `class_scores`),
  (d) the similarity evaluation ranks by (`score`) and the modality gap.

| kind             | embedding                                 | similarity                   | range     |
| sphere           | one [CLS], L2-normalised                  | uᵀv                          | [−1, 1]   |
| oblique          | d = n·m, m contiguous chunks of n, each   | Σₖ⟨uₖ, vₖ⟩                   | [−m, m]   |
|                  | L2-normalised (Ob(n, m))                  |                              |           |
| multi            | m [CLS] tokens → shared projection to n,  | Σₖ⟨uₖ, vₖ⟩                   | [−m, m]   |
|                  | each normalised (Multi(n, m))             |                              |           |
| oblique_geodesic | as oblique                                | −sqrt(Σₖ arccos²⟨uₖ, vₖ⟩)    | [−π√m, 0] |
| euclidean        | one [CLS], not normalised                 | −‖u − v‖                     | (−∞, 0]   |

Logits are s·similarity. n is the dimension of each sphere and m their number (the
paper's table order, docs/methods/topology.md §1). Multi differs from oblique only in the towers
(training/methods/topology/multi_token.py): after the towers both are chunk-normalised (B, m·n) rows.

Training tensors stay within B×B (the geodesic's B×B×m, as the paper says); evaluation
scores in blocks of query rows. Geodesic and Euclidean similarities are computed in float32
even under bf16 autocast (1 − 1e-6 rounds to 1 in bf16 and the arccos gradient blows up).
"""

from __future__ import annotations

import math
import numpy as np
import torch
import torch.nn.functional as F

from training.config import TopologyConfig

TOPOLOGY_KINDS = ("sphere", "oblique", "multi", "oblique_geodesic", "euclidean")
MULTI_TEXT_ROUTES = ("auto", "prepend", "append")
COSINE_CLAMP = 1e-6  # geodesic: arccos of a cosine clamped to [−1 + 1e-6, 1 − 1e-6]
SQRT_EPS = 1e-12  # inside the geodesic's and the Euclidean distance's square root
SCORE_BLOCK_ROWS = 1024  # evaluation: query rows scored at once


def chunk_normalize(x: torch.Tensor, m: int) -> torch.Tensor:
    """(..., m·n) -> (..., m·n) with each contiguous chunk of n scaled to unit norm."""
    return F.normalize(x.unflatten(-1, (m, -1)), dim=-1).flatten(-2)


def float32(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]


def without_autocast(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


class Sphere:
    """CLIP's unit hypersphere. Subclasses override the parts that differ."""

    kind = "sphere"
    # True where similarity is an inner product of the embeddings, so the template-average of
    # distances equals the distance to the mean prompt embedding (precomputable per class).
    inner_product = True

    def __init__(self, n: int, m: int = 1):
        if n < 1 or m < 1:
            raise ValueError(f"topology {self.kind}: need n >= 1 and m >= 1, got n={n}, m={m}")
        self.n = n
        self.m = m

    @property
    def dim(self) -> int:
        return self.n * self.m

    @property
    def class_tokens(self) -> int:
        """[CLS] tokens each tower pools (multi: m; every other kind pools one)."""
        return 1

    def describe(self) -> dict:
        """JSON-safe record (an unbounded end of the range is None)."""
        low, high = (None if math.isinf(x) else x for x in self.similarity_range())
        return {"kind": self.kind, "n": self.n, "m": self.m, "similarity_range": [low, high]}

    def similarity_range(self) -> tuple[float, float]:
        return -float(self.m), float(self.m)

    # (a) embedding -------------------------------------------------------------------------
    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        return F.normalize(raw, dim=-1)

    # (b) training logits -------------------------------------------------------------------
    def similarity(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(A, d), (B, d) embeddings -> (A, B). Inner-product kinds: one matmul of the
        flattened rows, which equals the per-sphere sum Σₖ U_k V_kᵀ."""
        return u @ v.T

    def logits(self, u: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return scale * self.similarity(u, v)

    # (c) class embeddings from templates ---------------------------------------------------
    def class_embeddings(self, prompts: np.ndarray) -> np.ndarray | None:
        """(C, T, d) prompt embeddings -> (C, d) class embeddings when the template average
        can be precomputed, else None. Sphere: CLIP's rule (normalise each prompt, average,
        normalise again), in float64 for parity with CLIP_benchmark."""
        prompts = np.asarray(prompts, np.float64)
        unit = prompts / np.linalg.norm(prompts, axis=-1, keepdims=True)
        mean = unit.mean(axis=1)
        return mean / np.linalg.norm(mean, axis=-1, keepdims=True)

    def class_scores(self, images: np.ndarray, prompts: np.ndarray) -> np.ndarray:
        """(N, d) image embeddings, (C, T, d) prompt embeddings -> (N, C). Where the average
        cannot be precomputed, the distances to every template's prompt are averaged, a block
        of images at a time (never an (N, C·T) array)."""
        weights = self.class_embeddings(prompts)
        if weights is not None:
            return self.score(images, weights)
        n_classes, n_templates = prompts.shape[:2]
        flat = np.asarray(prompts).reshape(n_classes * n_templates, -1)
        blocks = [
            self.score(images[s : s + SCORE_BLOCK_ROWS], flat).reshape(-1, n_classes, n_templates).mean(axis=2)
            for s in range(0, len(images), SCORE_BLOCK_ROWS)
        ]
        return np.concatenate(blocks) if blocks else np.zeros((0, n_classes))

    # (d) evaluation similarity -------------------------------------------------------------
    def score(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """(A, d), (B, d) evaluation features (NumPy) -> (A, B) similarity, in float64, in
        blocks of A's rows."""
        b_t = torch.as_tensor(np.asarray(b, np.float64))
        a = np.asarray(a, np.float64)
        with torch.no_grad():
            blocks = [
                self.similarity(torch.as_tensor(a[s : s + SCORE_BLOCK_ROWS]), b_t).numpy()
                for s in range(0, len(a), SCORE_BLOCK_ROWS)
            ]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(b_t)))

    def modality_gap(self, images: np.ndarray, texts: np.ndarray) -> float:
        """‖mean û − mean v̂‖ / √m over paired rows, rows mapped onto the topology's manifold
        (`embed`): the sphere's usual gap; for m chunks, the root mean square over the spheres
        of each sphere's centroid distance (equal to the sphere's at m = 1)."""
        u = self.embed(torch.as_tensor(np.asarray(images, np.float64))).numpy()
        v = self.embed(torch.as_tensor(np.asarray(texts, np.float64))).numpy()
        return float(np.linalg.norm(u.mean(axis=0) - v.mean(axis=0)) / math.sqrt(self.m))


class Oblique(Sphere):
    """Ob(n, m): the product of m spheres S^{n−1}; similarity −tr = Σₖ⟨uₖ, vₖ⟩. Its template
    rule averages the chunk-normalised prompt embeddings and does not re-normalise (that
    equals averaging the distances)."""

    kind = "oblique"

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        return chunk_normalize(raw, self.m)

    def class_embeddings(self, prompts: np.ndarray) -> np.ndarray | None:
        prompts = np.asarray(prompts, np.float64)
        chunks = prompts.reshape(*prompts.shape[:-1], self.m, self.n)
        unit = chunks / np.linalg.norm(chunks, axis=-1, keepdims=True)
        return unit.reshape(prompts.shape).mean(axis=1)


class MultiToken(Oblique):
    """Multi(n, m): m [CLS] tokens in both towers, a shared projection to n dims each."""

    kind = "multi"

    @property
    def class_tokens(self) -> int:
        return self.m


class ObliqueGeodesic(Oblique):
    """Ob(n, m) with the geodesic distance Geo = sqrt(Σₖ arccos²⟨uₖ, vₖ⟩); similarity −Geo.
    Builds the (A, B, m) tensor of per-sphere cosines (the paper's memory note)."""

    kind = "oblique_geodesic"
    inner_product = False

    def similarity_range(self) -> tuple[float, float]:
        return -math.pi * math.sqrt(self.m), 0.0

    def similarity(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with without_autocast(u.device.type):
            u, v = float32(u, v)
            cosines = torch.einsum("akn,bkn->abk", u.unflatten(-1, (self.m, self.n)), v.unflatten(-1, (self.m, self.n)))
            angles = torch.arccos(cosines.clamp(-1 + COSINE_CLAMP, 1 - COSINE_CLAMP))
            return -torch.sqrt(angles.square().sum(dim=-1) + SQRT_EPS)

    def class_embeddings(self, prompts: np.ndarray) -> np.ndarray | None:
        return None  # distances are averaged over templates explicitly


class Euclidean(Sphere):
    """Unnormalised embeddings, similarity −‖u − v‖ from ‖u‖² + ‖v‖² − 2uᵀv (clamped at 0; no
    (A, B, d) difference tensor)."""

    kind = "euclidean"
    inner_product = False

    def similarity_range(self) -> tuple[float, float]:
        return -math.inf, 0.0

    def embed(self, raw: torch.Tensor) -> torch.Tensor:
        return raw

    def similarity(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with without_autocast(u.device.type):
            u, v = float32(u, v)
            squared = u.square().sum(dim=1)[:, None] + v.square().sum(dim=1)[None, :] - 2 * (u @ v.T)
            return -torch.sqrt(squared.clamp(min=0) + SQRT_EPS)

    def class_embeddings(self, prompts: np.ndarray) -> np.ndarray | None:
        return None

    def modality_gap(self, images: np.ndarray, texts: np.ndarray) -> float:
        """‖mean u − mean v‖ of the raw (unnormalised) paired features: on this topology the
        gap keeps the features' own scale."""
        return float(np.linalg.norm(np.mean(images, axis=0) - np.mean(texts, axis=0)))


TOPOLOGIES: dict[str, type[Sphere]] = {
    cls.kind: cls for cls in (Sphere, Oblique, MultiToken, ObliqueGeodesic, Euclidean)
}


def check_topology_config(config: TopologyConfig) -> None:
    if config.kind not in TOPOLOGIES:
        raise ValueError(f"unknown topology.kind {config.kind!r}; known: {', '.join(TOPOLOGY_KINDS)}")
    if config.text_tokens not in MULTI_TEXT_ROUTES:
        raise ValueError(f"unknown topology.text_tokens {config.text_tokens!r}; known: {MULTI_TEXT_ROUTES}")
    if config.m < 1 or config.n < 0:
        raise ValueError(
            f"topology {config.kind}: need m >= 1 and n >= 0 (0: embed_dim / m), got n={config.n}, m={config.m}"
        )
    if config.kind in ("sphere", "euclidean") and config.m != 1:
        raise ValueError(
            f"topology.kind={config.kind} is one vector per sample: leave topology.m at 1 "
            f"(got {config.m}); the product of spheres is topology.kind=oblique"
        )


def resolve_sphere_dim(config: TopologyConfig, embed_dim: int) -> int:
    """n for a tower whose projection is embed_dim wide. Chunked kinds on one [CLS] must
    split embed_dim exactly; multi projects each token to n (any n; default embed_dim / m)."""
    if config.n == 0:
        if embed_dim % config.m:
            raise ValueError(
                f"topology {config.kind}: embed_dim {embed_dim} does not split into "
                f"m={config.m} spheres; set topology.n"
            )
        return embed_dim // config.m
    if config.kind != "multi" and config.n * config.m != embed_dim:
        raise ValueError(
            f"topology {config.kind}({config.n}, {config.m}) needs n·m = {config.n * config.m} "
            f"= the tower's embed_dim ({embed_dim})"
        )
    return config.n


def build_topology(config: TopologyConfig, embed_dim: int) -> Sphere:
    check_topology_config(config)
    return TOPOLOGIES[config.kind](resolve_sphere_dim(config, embed_dim), config.m)


def topology_from_info(info: dict) -> Sphere:
    """The topology a report's checkpoint info describes ({"kind", "n", "m"})."""
    return TOPOLOGIES[info["kind"]](int(info["n"]), int(info["m"]))
