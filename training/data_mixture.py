"""A run's data: one build or a weighted mixture of builds, as `--data` names them
(`s3://b/shards/cc12m/ID:0.7 s3://b/shards/yfcc15m/ID:0.3`; a build without a weight
weighs 1). The driver reads each build's manifest once; the sources travel to the workers
with the run's plan, and the checkpoint records every manifest digest and weight, which a
resume must match (the URIs may change: a build copied to S3 is the same build)."""

from __future__ import annotations

import math
import re

from pipelines import shards
from training.data_order import Source

WEIGHT_SUFFIX = re.compile(r"^(?P<uri>.*):(?P<weight>[-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)$")
DIGESTS_KEY, WEIGHTS_KEY, URIS_KEY = "manifest_digests", "data_weights", "data_uris"  # in state.json


def parse_build_spec(spec: str) -> tuple[str, float]:
    """ "URI[:WEIGHT]" -> (URI, weight); a trailing ":<number>" is the weight."""
    match = WEIGHT_SUFFIX.match(spec.strip())
    uri, weight = (match["uri"], float(match["weight"])) if match else (spec.strip(), 1.0)
    if not uri or not math.isfinite(weight) or weight <= 0:
        raise ValueError(
            f"--data {spec!r}: a build URI with an optional positive weight, e.g. s3://bucket/shards/cc12m/ID:0.7"
        )
    return uri, weight


def parse_builds(specs) -> list[tuple[str, float]]:
    """The run's (URI, normalised weight) pairs, in the order given."""
    if not specs:
        raise ValueError("--data: name at least one build")
    pairs = [parse_build_spec(s) for s in specs]
    uris = [u for u, _ in pairs]
    if len(set(uris)) != len(uris):
        raise ValueError(f"--data names a build twice: {uris} (give it one weight)")
    total = sum(w for _, w in pairs)
    return [(u, w / total) for u, w in pairs]


def load_sources(specs) -> list[Source]:
    """Each build's manifest read, checked non-empty and digested, with its weight."""
    sources = []
    for uri, weight in parse_builds(specs):
        manifest = shards.read_manifest(uri)
        source = Source(uri, weight, manifest["shards"], shards.manifest_digest(manifest))
        if len(specs) > 1 and source.n_samples == 0:
            raise ValueError(f"--data {uri}: the build has no samples, it cannot take a share of a mixture")
        sources.append(source)
    digests = [s.digest for s in sources]
    if len(set(digests)) != len(digests):
        raise ValueError(f"--data names the same build (manifest sha256) under two URIs: {[s.uri for s in sources]}")
    return sources


def describe_sources(sources: list[Source]) -> dict:
    """What state.json records of the run's data: digests, weights and URIs, in --data order."""
    return {
        DIGESTS_KEY: [s.digest for s in sources],
        WEIGHTS_KEY: [round(s.weight, 12) for s in sources],
        URIS_KEY: [s.uri for s in sources],
    }


def saved_sources(state: dict) -> dict:
    """describe_sources of a saved state.json (checkpoints from before mixtures: one build)."""
    if DIGESTS_KEY in state:
        return {k: state.get(k) for k in (DIGESTS_KEY, WEIGHTS_KEY, URIS_KEY)}
    return {DIGESTS_KEY: [state.get("manifest_digest")], WEIGHTS_KEY: [1.0], URIS_KEY: [state.get("data_uri")]}


def source_differences(saved: dict, sources: list[Source]) -> list[str]:
    """What a resume would change of the run's data (empty: the same builds and weights)."""
    before = saved_sources(saved)
    now = describe_sources(sources)
    if before[DIGESTS_KEY] == now[DIGESTS_KEY] and all(
        math.isclose(a, b, rel_tol=1e-9) for a, b in zip(before[WEIGHTS_KEY], now[WEIGHTS_KEY])
    ):
        return []

    def show(d: dict) -> str:
        return ", ".join(
            f"{u} (sha256 {str(g)[:12]}, weight {w:g})" for u, g, w in zip(d[URIS_KEY], d[DIGESTS_KEY], d[WEIGHTS_KEY])
        )

    return [f"builds: {show(before)} -> {show(now)}"]


def to_plan(sources: list[Source]) -> list[dict]:
    return [{"uri": s.uri, "weight": s.weight, "entries": s.entries, "digest": s.digest} for s in sources]


def from_plan(plan: list[dict]) -> list[Source]:
    return [Source(p["uri"], p["weight"], p["entries"], p["digest"]) for p in plan]
