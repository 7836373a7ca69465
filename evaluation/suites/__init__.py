"""Named evaluation suites: JSON files next to this module, one per paper's evaluation.

A suite is {"name", "description", "roots": {root: default URI}, "benchmarks": [entry, ...]};
an entry is {"name", "task", "test": dataset spec[, "train": spec][, "groups": [...]][, "options"]},
a dataset spec {"format", "path", reader arguments...}. `{root}` placeholders in spec strings
resolve to the suite's roots, which `--root NAME=URI` overrides on the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

SUITES_DIR = Path(__file__).resolve().parent
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def available_suites() -> list[str]:
    return sorted(p.stem for p in SUITES_DIR.glob("*.json"))


def read_suite(name_or_path: str) -> dict:
    """A suite by name (evaluation/suites/<name>.json) or by path to a JSON file."""
    path = Path(name_or_path)
    if not path.is_file():
        path = SUITES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no suite {name_or_path!r}; named suites: {available_suites()}")
    suite = json.loads(path.read_text(encoding="utf-8"))
    for key in ("name", "benchmarks"):
        if key not in suite:
            raise ValueError(f"suite {path} lacks {key!r}")
    return suite


def resolve_placeholders(value, roots: dict[str, str], where: str):
    """`{root}` in every string of a spec replaced by that root's URI."""
    if isinstance(value, dict):
        return {k: resolve_placeholders(v, roots, where) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_placeholders(v, roots, where) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(1) not in roots:
            raise ValueError(f"{where}: unknown root {{{match.group(1)}}}; pass --root {match.group(1)}=URI")
        return roots[match.group(1)].rstrip("/")

    return PLACEHOLDER.sub(substitute, value)


def suite_entries(name_or_path: str, overrides: dict[str, str] | None = None) -> list[dict]:
    """The suite's benchmark entries with their roots resolved in the dataset specs (command-line
    roots win); options are left as written (a zero-shot template's {c} is not a root)."""
    suite = read_suite(name_or_path)
    roots = {**suite.get("roots", {}), **(overrides or {})}
    entries = []
    for entry in suite["benchmarks"]:
        where = f"suite {suite['name']}, benchmark {entry.get('name')}"
        specs = {k: v for k, v in entry.items() if k != "options"}  # options hold templates' {c}
        entries.append(
            {
                **resolve_placeholders(specs, roots, where),
                **({"options": entry["options"]} if "options" in entry else {}),
                "suite": suite["name"],
            }
        )
    return entries
