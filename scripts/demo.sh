#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the main job: the whole Phase 1 plan on the tiny
# preset (the shipped tiny backbones copied -> synthetic data -> 12 ablation runs -> locked config
# -> 28-run scaling grid -> F3 in all three inference modes -> foveation evidence -> analysis report
# with every planned figure). 13-15 minutes on 2 idle cores of a recent CPU (23 on an AVX2 EPYC), set-up included;
# `--scale 2` (twice the budgets) about 25.
# Re-running resumes: finished runs are skipped, an interrupted one continues from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --main-job  # the test tools and real-weight extras come with scripts/test.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
OUT=${FVLM_OUT:-runs}
# `--scale X` (twice the budgets: `bash scripts/demo.sh --scale 2`) gets a folder of its own, named as
# fvlm phase1 names it by default, so that it never meets the settings of a run at another scale.
NAME=phase1-tiny
ARGS=("$@")
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --scale) SCALE=${ARGS[i + 1]:-} ;;
    --scale=*) SCALE=${ARGS[i]#--scale=} ;;
  esac
done
if [[ -n "${SCALE:-}" ]]; then
  SCALE=$(printf '%g' "$SCALE" 2> /dev/null) || true # not a number: fvlm phase1 refuses it below
  [[ "$SCALE" == 1 ]] || NAME="$NAME-x$SCALE"
fi
.venv/bin/fvlm phase1 --preset tiny --out "$OUT/$NAME" "$@"
echo "main job done: report in $OUT/$NAME/report/report.md, decisions in $OUT/$NAME/decisions.json"
