#!/usr/bin/env bash
# Issue 19's units in the order that answers the most per hour on a 2-core host. A verdict
# needs two seeds of both sides of a claim: the headline pair (vanilla, Tok64) gets all three
# seeds first; then the second seed of each other claim's rows (Tok48; the token-matched
# PyramidDrop and FastV; relaxed top-k; group and compacted positions), then the sweeps' two
# seeds, then everything else. Every unit is resumable and skipped once its line exists, so
# this can be stopped at any point and rerun by a later session:
#     setsid nohup nice -n 10 experiments/queue.sh > experiments/queue.log 2>&1 &
# Stop: kill -TERM -- -<its process group> (the trainer saves its step first).
# WORKERS (default 2) units run at once, unit i on worker i mod WORKERS: one tiny trainer does
# not keep two cores busy, and two at a time did 1.5x the training steps per hour of one here
# (2026-12-07: Tok64 2.7 + relaxed 2.4 steps/s side by side; alone 4.4 measured, ~2.8 estimated).
# A unit that needs another's model (a training-free row, the proposal) waits on its lock.
set -uo pipefail
# Started with setsid, this is a session of its own, and Linux shares the CPU between sessions'
# scheduler autogroups before niceness counts: `nice` alone would still take half the machine
# from a test suite in another session. So a session leader lowers its own autogroup too (best
# effort: not every kernel has autogroups); run without setsid, it leaves the caller's alone.
if [ "$(ps -o sid= -p $$ | tr -d ' ')" = "$$" ]; then echo 19 2>/dev/null > /proc/self/autogroup || true; fi
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-.venv/bin/python}
export JAX_PLATFORMS=cpu
ROOT_DIR=${ROOT_DIR:-experiments}  # where runs/ and results/ live (a worktree may point at main's)
WORKERS=${WORKERS:-2}
[[ $WORKERS =~ ^[1-9][0-9]*$ ]] || { echo "error: WORKERS=$WORKERS; allowed: a whole number >= 1" >&2; exit 2; }
n=0
unit() {
  n=$((n + 1)); [ $(((n - 1) % WORKERS)) -eq "$WORKER" ] || return 0
  "$PY" experiments/run.py --root "$ROOT_DIR" --table "$1" --rows "$2" --seeds "$3" "${@:4}" || echo "unit $1/$2/seed$3 ${*:4} failed: rc $?"
}
units() {
  for s in 0 1 2; do for r in vanilla fastv_free tok64; do unit methods "$r" "$s"; done; done
  for r in tok48 tok80 pdrop fastv proposal_free proposal pdrop_matched fastv_matched; do unit methods "$r" 0; done
  for r in tok48 pdrop_matched fastv_matched; do unit methods "$r" 1; done
  for s in 0 1; do for r in relaxed_t0.1 group compacted; do unit ablations "$r" "$s"; done; done
  # Is HiDrop's lead over vanilla (vanilla at chance on colour and shape at 1,500 steps) a budget
  # effect? The headline pair at three times the steps (RESULTS.md "Other budgets", gap against
  # vanilla of the same budget).
  for r in vanilla tok64; do unit methods "$r" 0 --steps 4500; done
  for s in 0 1; do for r in inject0 inject1 inject3 inject4 exit4 exit5 exit7 exit8; do unit ablations "$r" "$s"; done; done
  for r in tok80 pdrop fastv proposal_free proposal; do unit methods "$r" 1; done
  for s in 0 1; do unit ablations relaxed_t1 "$s"; done
  for r in tok48 tok80 pdrop fastv proposal_free proposal pdrop_matched fastv_matched; do unit methods "$r" 2; done
  for s in 0 1 2; do unit ablations "" "$s"; done
}
for w in $(seq 0 $((WORKERS - 1))); do (WORKER=$w; units) & done
wait
