#!/bin/sh
# Installs quadrant into the active Python environment.
#   sh scripts/install.sh          runtime only
#   sh scripts/install.sh test     runtime + test dependencies
# torch goes first, as the CPU build of 2.13.0, unless a torch is already there
# (a GPU machine keeps its own CUDA build): a bare `torch` requirement would pull
# a multi-GB CUDA build onto a CPU-only machine.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "installing torch 2.13.0 (CPU build)"
  # A machine whose pip already sees the CPU wheel (a local wheel folder or mirror)
  # takes it from there; elsewhere PyTorch's CPU index serves it.
  "$PY" -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null \
    || "$PY" -m pip install --quiet "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
if [ "$1" = "test" ]; then
  "$PY" -m pip install --quiet -e ".[test]"
  # The chat page's test drives a real Chromium: Debian's package, where apt-get can install it.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing chromium (Debian package) for the browser test"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "chromium could not be installed; the browser test will be skipped"
  fi
  # Mooncake Transfer Engine (the --kv-transport mooncake tests) links libibverbs, which Debian ships.
  if ! ldconfig -p 2>/dev/null | grep -q libibverbs.so.1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    echo "installing libibverbs1 (Debian package) for Mooncake Transfer Engine"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q libibverbs1 >/dev/null 2>&1; } \
      || echo "libibverbs1 could not be installed; the Mooncake tests will be skipped"
  fi
else
  "$PY" -m pip install --quiet -e .
fi
