#!/usr/bin/env bash
# Creates .venv and installs fvlm into it. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    # The CPU build: an unpinned torch would pull a multi-GB CUDA build onto a machine without a GPU.
    "${PIP[@]}" torch==2.13.0
  fi
fi
"${PIP[@]}" -e '.[dev,slurm]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
