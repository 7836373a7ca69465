"""Architecture guards: data flows one way and Ray stays at the edges (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "scoring", "training", "evaluation")
# The job entry points and the few modules they name that may import Ray: per package its
# assembly module, and for training what Ray Train's controller unpickles (ray_entry, light
# so that the controller never imports the training code) and the Ray Data stage its actors
# import (data_stage, without the model and the driver).
RAY_MODULES = {"pipelines/build.py", "pipelines/ray_setup.py", "pipelines/prepare_cc12m.py",
               "training/train.py", "training/ray_entry.py", "training/data_stage.py",
               "evaluation/evaluate.py"}
# scoring/ holds what training's in-run evaluation and the evaluation job share (the small-set
# readers, the zero-shot and retrieval metrics): both import it, it imports neither, and
# training still never imports evaluation.
FORBIDDEN = {"pipelines": {"scoring", "training", "evaluation"}, "scoring": {"training", "evaluation"},
             "training": {"evaluation"}, "evaluation": set()}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def package_files():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path, path.relative_to(ROOT).as_posix()


def test_only_entry_points_and_assembly_modules_import_ray():
    offenders = [rel for _, path, rel in package_files()
                 if "ray" in imported_roots(path) and rel not in RAY_MODULES
                 and not rel.startswith("pipelines/prepare_")]
    assert offenders == []


def test_imports_flow_one_way():
    offenders = [(rel, sorted(imported_roots(path) & FORBIDDEN[pkg])) for pkg, path, rel in package_files()
                 if imported_roots(path) & FORBIDDEN[pkg]]
    assert offenders == []


def test_nothing_imports_evaluation_and_infra_has_no_python():
    for folder in ("pipelines", "scoring", "training", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if folder in ("scripts", "benchmarks"):
                continue  # top-level drivers may run every job
            assert "evaluation" not in imported_roots(path), path
    assert not list((ROOT / "infra").rglob("*.py"))



HEAVY = ("torch", "open_clip", "ot", "img2dataset", "sklearn", "training.train", "training.model")


def test_what_ray_train_and_ray_data_processes_import_stays_light():
    """Ray Train's controller unpickles ray_entry (nothing of the training code: ~9 s of
    imports per launch on two cores), each Ray Data actor imports data_stage (the tokenizer,
    not the model, POT or img2dataset), and POT and img2dataset load only where they are used.
    One fresh interpreter imports the three in turn and lists the heavy modules after each."""
    import subprocess
    import sys
    code = "; ".join(["import sys", *(f"import {m}; print(','.join(h for h in {HEAVY!r} if h in sys.modules))"
                                      for m in ("training.ray_entry", "training.data_stage", "training.train"))])
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    entry, data_stage, train = ([m for m in line.split(",") if m] for line in out.stdout.splitlines())
    assert entry == [] and data_stage == ["torch", "open_clip"]
    assert not {"ot", "img2dataset", "sklearn"} & set(train)
