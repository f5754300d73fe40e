#!/usr/bin/env bash
# The whole check of scripts/test.sh on the newest releases that pyproject.toml's ranges allow, in an
# environment of its own (.venv-latest), so that a new release of a dependency is seen to pass or fail
# before a fresh machine installs it. .venv and scripts/constraints.txt are left as they are unless
#   bash scripts/test-latest.sh --refresh [pytest args]
# is given and the run passes: then the versions it ran with become scripts/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
REFRESH=0
if [ "${1:-}" = --refresh ]; then
  REFRESH=1
  shift
fi
export FVLM_VENV=.venv-latest FVLM_CONSTRAINTS=none
# A fresh environment every time: an old one would keep the releases it got last time.
rm -rf "$FVLM_VENV"
bash scripts/test.sh "$@"
"$FVLM_VENV"/bin/python -m pip freeze --disable-pip-version-check | grep -v -i -e '^-e ' -e '^#' -e '^torch==' \
  > .fvlm_latest_freeze.txt
echo "scripts/test-latest.sh: passed with these versions, against scripts/constraints.txt:"
diff <(grep -v '^#' scripts/constraints.txt) .fvlm_latest_freeze.txt || true
if [ "$REFRESH" = 1 ]; then
  { grep '^#' scripts/constraints.txt; cat .fvlm_latest_freeze.txt; } > scripts/constraints.txt.tmp
  mv scripts/constraints.txt.tmp scripts/constraints.txt
  echo "scripts/test-latest.sh: scripts/constraints.txt now lists them; commit it"
fi
rm -f .fvlm_latest_freeze.txt
