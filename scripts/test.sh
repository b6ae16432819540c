#!/usr/bin/env bash
# Sets up and runs every check: ruff, the documentation build (warnings are errors), and the tests of
# the library (tests/) and of the reproduction suite (repro/tests/), two worker processes, one torch
# thread each.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/setup.sh
"$PY" -m ruff check src tests benchmarks repro docs
"$PY" -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
"$PY" -m pytest -n 2 -q "$@"

# Second stage: the tests marked timm (they skip above, where timm cannot import). timm needs a
# torchvision that matches torch, and torchvision 0.29.1 needs torch 2.14.1 (a CUDA build that runs on
# the CPU, ~5.5 GB), so they run in their own venv: TIMM_VENV (default .venv-timm, made and reused),
# skipped with SKIP_TIMM=1.
if [ "${SKIP_TIMM:-0}" != 1 ]; then
  VENV=${TIMM_VENV:-.venv-timm}
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  # Pillow 13 refuses posterize(bits=0), which timm's RandAugment asks for at magnitude 10 (the Swin recipe).
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31" "pillow<13"
  # The torch pin above stays: nothing below asks for another torch.
  "$VENV/bin/python" -m pip install -q -e ".[test]" -e "repro[test]" "torch==2.14.1"
  # Status 5 is pytest's "no tests selected": arguments such as -k state_dict select none of this stage.
  "$VENV/bin/python" -m pytest -n 2 -q -m timm "$@" || [ $? = 5 ]
fi
