#!/usr/bin/env bash
# Creates .venv once and installs the pinned requirements; re-installs only when a requirements file changes.
# Sourced by studio.sh and test.sh. Usage: setup_env.sh [requirements files...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
reqs=("${@:-requirements.txt}")
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q -U pip
fi
stamp=".venv/.installed-$(cat "${reqs[@]}" | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  # torch is installed on its own: the plain PyPI wheel of this version is a CUDA build on Linux and a CPU
  # build where only that is available. Any torch >= 2.5 the user already has is kept.
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch"
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  for r in "${reqs[@]}"; do
    echo "[setup] installing $r"
    .venv/bin/python -m pip install -q -r "$r"
  done
  touch "$stamp"
fi
