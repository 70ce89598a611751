#!/usr/bin/env bash
# Issue 19's units in the order that answers the most per hour on a 2-core host: error bars on
# the headline claim (vanilla vs Tok64, all three seeds) first, then seed 0 of every other row,
# then the remaining seeds, then the ablations. Every unit is resumable and skipped once its line
# exists, so this can be stopped at any point and rerun by a later session:
#     nohup nice -n 10 experiments/queue.sh > experiments/queue.log 2>&1 &
# Stop: kill -TERM -- -<its process group> (the trainer saves its step first).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
ROOT_DIR=${ROOT_DIR:-experiments}  # where runs/ and results/ live (a worktree may point at main's)
unit() { "$PY" experiments/run.py --root "$ROOT_DIR" --table "$1" --rows "$2" --seeds "$3" || echo "unit $1/$2/seed$3 failed: rc $?"; }
for s in 0 1 2; do for r in vanilla fastv_free tok64; do unit methods "$r" "$s"; done; done
for r in tok48 tok80 pdrop fastv proposal_free proposal pdrop_matched fastv_matched; do unit methods "$r" 0; done
for s in 1 2; do for r in tok48 tok80 pdrop fastv proposal_free proposal pdrop_matched fastv_matched; do unit methods "$r" "$s"; done; done
for s in 0 1 2; do unit ablations "" "$s"; done
