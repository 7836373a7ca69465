"""Architecture guards: data flows one way and Ray stays at the edges (ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "training", "evaluation")
# The job entry points and the one assembly module per package that may import Ray.
RAY_MODULES = {"pipelines/build.py", "pipelines/ray_setup.py", "pipelines/prepare_cc12m.py",
               "training/train.py", "evaluation/evaluate.py"}
FORBIDDEN = {"pipelines": {"training", "evaluation"}, "training": {"evaluation"}, "evaluation": set()}


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
    for folder in ("pipelines", "training", "scripts", "benchmarks"):
        for path in (ROOT / folder).rglob("*.py"):
            if folder in ("scripts", "benchmarks"):
                continue  # top-level drivers may run every job
            assert "evaluation" not in imported_roots(path), path
    assert not list((ROOT / "infra").rglob("*.py"))
