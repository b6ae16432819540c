#!/usr/bin/env bash
# Sets up and runs the reproduction demo: the paper's toy problem and MNIST, quick presets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m adoptim_repro demo "$@"
