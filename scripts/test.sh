#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the linter, the format check, the type checker
# and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# setup.sh fetched the real SmolLM2 weights: their tests must run, not skip for want of them.
export FVLM_REQUIRE_REAL_WEIGHTS=1
# Lint, format and types first: seconds to a minute, and a failure there needs no test run to see.
# Their settings live in pyproject.toml ([tool.ruff], [tool.mypy]).
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q --durations=15 "$@"
