#!/usr/bin/env bash
# Exports another commit's fvlm/ for `benchmarks/gpu_check.py --baseline`, and prints the device command.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: benchmarks/prepare_baseline.sh [REF] [DIR]

Exports the fvlm/ package of git ref REF (default: origin/main, else main) with `git archive` into
DIR (default: gpu_baseline; a relative DIR is taken from the repository's root), with a marker file
.fvlm-baseline naming the ref and commit, and prints the command that measures it beside the working tree's code:

    python benchmarks/gpu_check.py --sizes 135m --parts steps,cudagraphs --no-record --baseline DIR

DIR must be inside the repository, untracked and not ignored by git: the device machine's copy of
the working tree carries only such files (tracked ones and untracked ones git does not ignore), and
nothing from .git. Delete DIR after the device run (rm -rf DIR): it must never be committed. An
existing DIR is replaced only if it holds the marker of an earlier export.
EOF
}

case "${1:-}" in
-h | --help)
    usage
    exit 0
    ;;
esac
if [ $# -gt 2 ]; then
    usage >&2
    exit 2
fi

root=$(git rev-parse --show-toplevel 2>/dev/null) || {
    echo "prepare_baseline.sh: not inside a git checkout" >&2
    exit 2
}
cd "$root"
if [ $# -ge 1 ]; then
    ref=$1
elif git rev-parse --verify -q origin/main >/dev/null; then
    ref=origin/main
else
    ref=main
fi
dir=${2:-gpu_baseline}
commit=$(git rev-parse --verify -q "$ref^{commit}") || {
    echo "prepare_baseline.sh: REF: no commit named '$ref'" >&2
    exit 2
}

if [ -e "$dir" ]; then
    if [ ! -f "$dir/.fvlm-baseline" ]; then
        echo "prepare_baseline.sh: DIR: $dir exists and is no earlier baseline export (no .fvlm-baseline); not replacing it" >&2
        exit 2
    fi
    rm -rf "$dir"
fi
mkdir -p "$dir"
git archive --format=tar "$commit" fvlm | tar -x -C "$dir"
{
    echo "ref: $ref"
    echo "commit: $commit"
    echo "exported: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$dir/.fvlm-baseline"

# Where the copy cannot travel to the device machine, say so (a temporary folder outside the repo is
# fine for a run on this machine).
abs=$(cd "$dir" && pwd -P)
case "$abs/" in
"$(pwd -P)"/*)
    if git check-ignore -q "$dir/fvlm/__init__.py"; then
        echo "warning: git ignores $dir, so the device machine's copy of the tree will not carry it" >&2
    elif [ -n "$(git ls-files -- "$dir" | head -n 1)" ]; then
        echo "warning: $dir holds tracked files; it must not be committed" >&2
    fi
    ;;
*)
    echo "warning: $dir is outside the repository: the device machine's copy of the tree will not carry it" >&2
    ;;
esac

echo "exported fvlm/ of $ref ($commit) to $dir ($(du -sh "$dir" | cut -f1))"
echo "run on the device machine, from the repository root:"
echo "    python benchmarks/gpu_check.py --sizes 135m --parts steps,cudagraphs --no-record --baseline $dir"
echo "then delete the export: rm -rf $dir"
