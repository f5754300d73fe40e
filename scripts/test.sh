#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the linter, the format check, the type checker
# and the whole test suite. The environment is scripts/constraints.txt's (see scripts/setup.sh);
# scripts/test-latest.sh runs the same on the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FVLM_VENV:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# setup.sh fetched the real SmolLM2 weights: their tests must run, not skip for want of them.
export FVLM_REQUIRE_REAL_WEIGHTS=1
# Lint, format and types first: seconds to a minute, and a failure there needs no test run to see.
# Their settings live in pyproject.toml ([tool.ruff], [tool.mypy]).
"$VENV"/bin/ruff check .
"$VENV"/bin/ruff format --check .
"$VENV"/bin/mypy
exec "$VENV"/bin/python -m pytest -q --durations=15 "$@"
