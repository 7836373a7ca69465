#!/usr/bin/env bash
# The demo, end to end on one machine: demo corpus on a loopback mirror -> prepare_cc12m.py
# (Ray Data) -> FLIP training (Ray Train, CPU workers) -> evaluation job -> report.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
source scripts/offline_env.sh
exec .venv/bin/python scripts/run_demo.py "$@"
