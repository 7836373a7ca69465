#!/usr/bin/env bash
# Create .venv and install the pinned project with its test extras; a no-op when the
# installed set already matches pyproject.toml. Used by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[bootstrap] installing pinned dependencies into .venv (first run: a few minutes)"
  "$PYTHON_BIN" -m venv .venv
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test]"
  .venv/bin/python -m pip check
  rm -f .venv/.installed-* && touch "$stamp"
fi
