"""img2dataset's downloader and resizer, imported without its package's `__init__`.

`import img2dataset.downloader` first runs `img2dataset/__init__.py`, which imports its CLI
(`img2dataset.main`) and with it every writer: webdataset, and through webdataset torch. That
costs ~2.5 s of CPU in each process that fetches (about 4 s in all, 3-6 s on a busy 2-core
machine), paid in the critical path of every prepare job's first shard, for modules a fetch
never uses. Here the package is registered without running its `__init__`, so importing a
submodule runs only that submodule (the downloader still imports img2dataset's logger, and
the resizer albumentations: ~1.3 s). The package's `__init__` runs, in full, the first time
anything asks the package for a name it lacks (`from img2dataset import download` keeps
working in the same process). The code that fetches and resizes is img2dataset's own.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import threading
import types

PACKAGE = "img2dataset"
_lock = threading.Lock()


def load(submodule: str) -> types.ModuleType:
    """`img2dataset.<submodule>`, with the package's `__init__` deferred if it has not run."""
    with _lock:
        if PACKAGE not in sys.modules:
            sys.modules[PACKAGE] = _deferred_package()
        return importlib.import_module(f"{PACKAGE}.{submodule}")


def _deferred_package() -> types.ModuleType:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        raise ModuleNotFoundError(f"{PACKAGE} is not installed", name=PACKAGE)
    package = importlib.util.module_from_spec(spec)
    package.__getattr__ = functools.partial(_finish_import, package, spec)  # PEP 562
    return package


def _finish_import(package: types.ModuleType, spec, name: str):
    """Runs the package's `__init__` (once), then answers `name` as a full import would."""
    with _lock:
        if "__getattr__" in package.__dict__:
            del package.__dict__["__getattr__"]
            spec.loader.exec_module(package)
    try:
        return package.__dict__[name]
    except KeyError:
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None


def load_downloader() -> types.ModuleType:
    """img2dataset's downloader (what a prepare job's workers load while it plans)."""
    return load("downloader")
