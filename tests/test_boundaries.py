"""Architecture guards (docs/architecture.md): data flows one way, Ray stays at the edges,
training never loads the download stack, and every method's parts live where its name points."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipelines", "scoring", "training", "evaluation")
# The job entry points and the few modules they name that may import Ray: per package its
# assembly module, and for training what Ray Train's controller unpickles (ray_entry, light
# so that the controller never imports the training code) and the Ray Data stage its actors
# import (data_stage, without the model and the driver).
RAY_MODULES = {
    "pipelines/build.py",
    "pipelines/ray_setup.py",
    "pipelines/prepare_cc12m.py",
    "pipelines/text_input.py",
    "training/train.py",
    "training/ray_entry.py",
    "training/data_stage.py",
    "evaluation/evaluate.py",
}
# scoring/ holds what training's in-run evaluation and the evaluation job share (the small-set
# readers, the zero-shot and retrieval metrics): both import it, it imports neither, and
# training still never imports evaluation.
FORBIDDEN = {
    "pipelines": {"scoring", "training", "evaluation"},
    "scoring": {"training", "evaluation"},
    "training": {"evaluation"},
    "evaluation": set(),
}


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name a file imports (`from a import b` gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def imported_roots(path: Path) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path)}


def package_files():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield package, path, path.relative_to(ROOT).as_posix()


def test_only_entry_points_and_assembly_modules_import_ray():
    offenders = [
        rel
        for _, path, rel in package_files()
        if "ray" in imported_roots(path) and rel not in RAY_MODULES and not rel.startswith("pipelines/prepare_")
    ]
    assert offenders == []


def test_imports_flow_one_way():
    offenders = [
        (rel, sorted(imported_roots(path) & FORBIDDEN[pkg]))
        for pkg, path, rel in package_files()
        if imported_roots(path) & FORBIDDEN[pkg]
    ]
    assert offenders == []


def test_infra_has_no_python():
    """(That nothing but evaluation itself and the top-level drivers in scripts/ and
    benchmarks/ imports evaluation is test_imports_flow_one_way's FORBIDDEN table.)"""
    assert not list((ROOT / "infra").rglob("*.py"))


HEAVY = ("torch", "open_clip", "ot", "img2dataset", "sklearn", "training.train", "training.model", "pipelines.build")


def test_what_ray_train_and_ray_data_processes_import_stays_light():
    """Ray Train's controller unpickles ray_entry (nothing of the training code: ~9 s of
    imports per launch on two cores), each Ray Data actor imports data_stage (the tokenizer,
    not the model, POT or img2dataset), and POT and img2dataset load only where they are used.
    One fresh interpreter imports the three in turn and lists the heavy modules after each."""
    import subprocess
    import sys

    code = "; ".join(
        [
            "import sys",
            *(
                f"import {m}; print(','.join(h for h in {HEAVY!r} if h in sys.modules))"
                for m in ("training.ray_entry", "training.data_stage", "training.train")
            ),
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    entry, data_stage, train = ([m for m in line.split(",") if m] for line in out.stdout.splitlines())
    assert entry == [] and data_stage == ["torch", "open_clip"]
    assert not {"ot", "img2dataset", "sklearn", "pipelines.build"} & set(train)


# What turns sources into shards (the downloader, the prepare jobs, the demo corpus and its
# mirror): training reads finished shards and never imports any of it.
DOWNLOAD_STACK = (
    "img2dataset",
    "pipelines.build",
    "pipelines.stages",
    "pipelines.img2dataset_modules",
    "pipelines.url_guard",
    "pipelines.mirror",
    "pipelines.demo_corpus",
    "pipelines.dedup",
    "pipelines.cc12m",
    "pipelines.yfcc",
    "pipelines.sharegpt4v",
    "pipelines.prepare_",
)


def test_training_never_imports_the_download_stack():
    offenders = [
        (rel, sorted(m for m in imported_modules(path) if m.startswith(DOWNLOAD_STACK)))
        for pkg, path, rel in package_files()
        if pkg in ("training", "scoring")
    ]
    assert [o for o in offenders if o[1]] == []


def test_the_guard_sees_a_forbidden_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from pipelines import build\nimport img2dataset.downloader\n")
    assert {m for m in imported_modules(probe) if m.startswith(DOWNLOAD_STACK)} == {
        "pipelines.build",
        "img2dataset.downloader",
    }


# Method parts are assembled by these modules; a part never imports its assembler.
ASSEMBLERS = ("training.model", "training.objectives", "training.train", "training.loop", "training.inference")


def test_method_parts_do_not_import_what_assembles_them():
    offenders = [
        (rel, sorted(m for m in imported_modules(path) if m.startswith(ASSEMBLERS)))
        for _, path, rel in package_files()
        if rel.startswith("training/methods/")
    ]
    assert [o for o in offenders if o[1]] == []


LEGACY_TOWERS = ROOT / "tests" / "fixtures" / "legacy" / "oblique" / "checkpoint_000001"


def method_components(method: str) -> list[type]:
    """The classes a method's model and objective are built from (towers, topology, patch and
    token selectors, mask network, objective and any regulariser around it)."""
    import torch

    from training.config import apply_overrides
    from training.methods.recipes import build_method_config
    from training.model import build_training_model
    from training.objectives import build_training_objective

    config = apply_overrides(build_method_config(method), {"model.arch": "clip-micro-p8-32"})
    if config.loss.regularizer == "cibr":
        config = apply_overrides(config, {"model.pretrained": str(LEGACY_TOWERS), "cibr.hidden": 8})
    model = build_training_model(config)
    objective = build_training_objective(config, 0, 1, model, torch.device("cpu"))
    parts = [
        model.tower,
        model.topology,
        model.patch_selector,
        model.token_selector,
        model.mask_network,
        objective,
        getattr(objective, "objective", None),
    ]
    return [type(p) for p in parts if p is not None]


def test_every_recipe_names_places_that_exist():
    from training.methods.recipes import METHODS

    methods_dir = ROOT / "training" / "methods"
    for name, recipe in METHODS.items():
        for place in recipe.parts:
            assert (methods_dir / place).is_dir() or (methods_dir / f"{place}.py").is_file(), (name, place)


def test_every_part_a_recipe_adds_lives_under_the_places_it_names():
    """What a method adds to plain CLIP on the sphere (any class not shared with the `clip`
    recipe and not open_clip's own) is defined under one of its recipe's places."""
    from training.methods.recipes import METHODS

    base = set(method_components("clip"))
    for name, recipe in METHODS.items():
        added = [c for c in method_components(name) if c not in base and not c.__module__.startswith("open_clip")]
        places = tuple(f"training.methods.{p}" for p in recipe.parts)
        misplaced = [
            f"{c.__module__}.{c.__qualname__}"
            for c in added
            if not (c.__module__ + ".").startswith(tuple(p + "." for p in places))
        ]
        assert misplaced == [], (name, recipe.parts)
        assert name == "clip" or added, f"{name} adds nothing the guard can see"


def test_comments_cite_the_projects_own_docs_and_every_cited_page_exists():
    """Design notes outside the repository are not cited; every cited docs page exists."""
    import re

    cited, outside = set(), []
    for folder in ("pipelines", "scoring", "training", "evaluation", "benchmarks", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".py", ".json", ".sh") or "fixtures" in path.parts:
                continue
            text = path.read_text()
            outside += [
                path.name
                for name in ("METHODS.md", "ARCHITECTURE.md", "PITFALLS.md", "STYLE.md")
                if re.search(rf"(?<![\w/]){name}", text) and path.name != "test_boundaries.py"
            ]
            cited |= set(re.findall(r"docs/[\w/.-]+?\.md", text))
    assert outside == []
    assert cited and sorted(c for c in cited if not (ROOT / c).is_file()) == []


def test_the_readme_layout_table_has_a_line_for_every_code_folder():
    import re

    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w/]+)/` \|", readme, re.M))
    folders = {p.relative_to(ROOT).parent.as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    folders |= {"infra", "benchmarks", "scripts", "docs", "tests"}
    assert sorted(folders - listed) == []


# A method's part may import the base every method shares and what its method builds on.
METHOD_BASE = ("training.methods.clip", "training.methods.topology.spaces")
BUILDS_ON = {"pgs": ("training.methods.flip",)}


def test_a_method_imports_no_other_method_beyond_the_base():
    offenders = []
    for _, path, rel in package_files():
        parts = rel.split("/")
        if parts[:2] != ["training", "methods"] or len(parts) < 4 and parts[2] in ("__init__.py", "recipes.py"):
            continue
        place = parts[2].removesuffix(".py")
        own = f"training.methods.{place}"
        allowed = (own, *METHOD_BASE, *BUILDS_ON.get(place, ()))
        others = [m for m in imported_modules(path) if m.startswith("training.methods.") and not m.startswith(allowed)]
        offenders += [(rel, m) for m in others]
    assert offenders == []


def test_the_readme_and_docs_name_only_files_that_exist():
    """Markdown links and backticked repository paths (`training/...py`) in README.md and
    docs/ resolve, so a moved module cannot leave its old path in the documentation."""
    import re

    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        text = page.read_text()
        links = [page.parent / t for t in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)]
        roots = "pipelines|training|evaluation|scoring|tests|scripts|benchmarks|infra|docs"
        named = re.findall(rf"`((?:{roots})/[\w/.-]*(?:\.(?:py|md|json|sh|yaml)|/))`", text)
        paths = [ROOT / p for p in named]
        missing += [
            (page.name, str(p.relative_to(ROOT))) for p in links + paths if not p.exists() and "*" not in p.name
        ]
    assert missing == []
