#!/usr/bin/env bash
# The whole test suite (unit, Ray wiring, end-to-end), installing what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/offline_env.sh
exec .venv/bin/python -m pytest "$@"
