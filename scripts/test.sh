#!/usr/bin/env bash
# The whole test suite (unit, Ray wiring, end-to-end), installing what it needs first; the
# formatter and linter go first (pyproject.toml [tool.ruff]), so the layout stays as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/offline_env.sh
.venv/bin/ruff format --check --quiet . || { echo "ruff format would change the files above: run .venv/bin/ruff format ." >&2; exit 1; }
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest "$@"
