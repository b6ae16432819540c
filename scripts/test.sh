#!/usr/bin/env bash
# Sets up and runs the whole test suite (two worker processes, one torch thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check src tests benchmarks
"$PY" -m pytest -n 2 -q "$@"
