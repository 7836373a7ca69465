"""Which code wrote an output: builds and checkpoints record it."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def code_version() -> str:
    """Git commit of the code (CLIPFORGE_CODE_VERSION wins: container images have no .git)."""
    if os.environ.get("CLIPFORGE_CODE_VERSION"):
        return os.environ["CLIPFORGE_CODE_VERSION"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
