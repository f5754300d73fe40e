#!/usr/bin/env bash
# Sets everything up on a fresh machine, then runs the main job: the whole Phase 1 plan on the tiny
# preset (the shipped tiny backbones copied -> synthetic data -> 12 ablation runs -> locked config
# -> 28-run scaling grid -> F3 in all three inference modes -> foveation evidence -> analysis report
# with every planned figure). 8-15 minutes on 2 idle cores of a recent CPU (23 on an AVX2 EPYC), set-up included;
# `--scale 2` (twice the budgets) 16-26.
# Re-running resumes: finished runs are skipped, an interrupted one continues from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --main-job  # the test tools and real-weight extras come with scripts/test.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
# The output folder is fvlm phase1's default: runs/phase1-tiny (the root: $FVLM_OUT), and with
# `--scale X` (`bash scripts/demo.sh --scale 2`: twice the budgets) runs/phase1-tiny-x<X>, a folder of
# its own, so that it never meets the settings of a run at another scale. Its last line names the
# report and the decisions.
.venv/bin/fvlm phase1 --preset tiny "$@"
