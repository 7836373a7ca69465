"""img2dataset's downloader and resizer load without its package __init__ (no webdataset or
torch in a fetching process), and the package is complete the moment anything asks it for more.

Each check runs in a fresh interpreter: the test process has img2dataset imported already.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_fresh(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PYTHONPATH": str(REPO),
            "NO_ALBUMENTATIONS_UPDATE": "1",
            "WANDB_MODE": "disabled",
            "PATH": "/usr/bin:/bin",
        },
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_fetching_modules_load_without_the_cli_and_its_writers():
    out = run_fresh("""
        import sys
        from pipelines import img2dataset_modules
        downloader = img2dataset_modules.load("downloader")
        resizer = img2dataset_modules.load("resizer")
        assert callable(downloader.download_image_with_retry) and callable(resizer.Resizer)
        print(sorted(m for m in ("torch", "webdataset", "img2dataset.main", "img2dataset.writer") if m in sys.modules))
    """)
    assert out == "[]"


def test_the_package_completes_its_import_when_asked_for_more():
    out = run_fresh("""
        from pipelines import img2dataset_modules
        downloader = img2dataset_modules.load("downloader")
        from img2dataset import download             # runs the package's __init__ now
        import img2dataset, img2dataset.downloader
        assert img2dataset.downloader is downloader  # the submodule is not loaded twice
        assert img2dataset_modules.load("resizer") is img2dataset.resizer
        try:
            img2dataset.no_such_name
        except AttributeError as error:
            print(download.__module__, "|", error)
    """)
    assert out == "img2dataset.main | module 'img2dataset' has no attribute 'no_such_name'"


def test_an_imported_package_is_used_as_it_is():
    out = run_fresh("""
        import img2dataset
        from pipelines import img2dataset_modules
        print(img2dataset_modules.load("downloader") is img2dataset.downloader)
    """)
    assert out == "True"
