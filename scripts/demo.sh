#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the main job on the embedded tiny default:
# synthetic data -> the tiny foveated run (F3 settings) -> three-mode evaluation and the synthetic
# multiple-choice benchmark -> analysis report. Re-running resumes or reuses what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
OUT=${FVLM_OUT:-runs}
FVLM=.venv/bin/fvlm
$FVLM flops
$FVLM train run_id=tiny-F3 out_dir="$OUT" "$@"
$FVLM eval "$OUT/tiny-F3" --max-samples 64
$FVLM analyze "$OUT/tiny-F3" --out "$OUT/analysis"
echo "main job done: run in $OUT/tiny-F3, evaluation in $OUT/tiny-F3/eval, report in $OUT/analysis/report.md"
