# Helpers shared by launch/local.sh and launch/tpu_pod.sh (sourced; set SCRIPT first).
# slurm_gpu.sbatch keeps a copy of the block below: sbatch runs a spool copy that cannot find
# this file (tests/test_launch_safety.py checks that the copy is identical).
# --- shared launcher helpers: begin

# Shell-quote one word the way Python's shlex.quote does (so printed commands can be pasted).
q() {
  if [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(q "$w")"; done
  printf '%s' "$out"
}

die() { echo "$SCRIPT: $*" >&2; exit 2; }

# The trainer's own flags (python -m hidrop_jax.train; tests check this list against train.py).
# Without `--`, the first of them starts TRAIN_ARGS.
TRAIN_FLAGS=(--config --workdir --coordinator --num_processes --process_id --distributed
  --nodistributed)

# The rule split_args implements, printed by every launcher's --help.
# shellcheck disable=SC2016,SC2034  # literal backquotes; used by the scripts that source this
ARG_RULE='Arguments (the same rule in every launcher):
  * launcher options come first; TRAIN_ARGS start after `--`, or without `--` at the first
    trainer flag (--config, --config.FIELD=VALUE, --workdir, --coordinator, --num_processes,
    --process_id, --distributed). `python -m hidrop_jax.train --help` lists them all.
  * before that point, an option the launcher does not know is an error that names it;
    after it, a launcher option is an error too: launcher options never reach the trainer.
  * --dry-run and -h/--help count wherever they appear, even after `--` or among TRAIN_ARGS:
    a dry run prints the exact commands and runs none of them.
  * a launcher option value may not start with "-" (`--name --zone z` is an error).'

_in() {  # _in WORD LIST...: is WORD one of LIST?
  local w=$1 x
  shift
  for x in "$@"; do [[ $x == "$w" ]] && return 0; done
  return 1
}

# split_args ARGV...: the one argument rule of every launcher. Needs VALUE_OPTS and FLAG_OPTS
# (the launcher's options taking a value / taking none; FLAG_OPTS holds --dry-run) and usage().
# Sets `opts` (the launcher options, normalised to `--opt VALUE` / `--opt`), `train_args` and
# `dry_run`.
#   * --dry-run anywhere (even after `--` or among TRAIN_ARGS) means a dry run, and is not
#     passed on; -h/--help anywhere prints the launcher's help. Neither ever launches.
#   * Launcher options come first. TRAIN_ARGS start after `--`, or without `--` at the first
#     of the trainer's flags (--config, --config.FIELD=..., --workdir, ...).
#   * Before that point anything else is an error naming it (a typo never reaches the trainer
#     after the machines are paid for). After it, a launcher option is an error too: it is
#     neither forwarded nor silently honoured.
#   * A launcher option's value may not start with '-' (`--name --zone z` is an error).
split_args() {
  local a name v
  dry_run=0
  opts=()
  train_args=()
  for a in "$@"; do
    # shellcheck disable=SC2034  # read by the launcher
    [[ $a == --dry-run ]] && dry_run=1
    if [[ $a == -h || $a == --help ]]; then usage; exit 0; fi
  done
  local allowed="${VALUE_OPTS[*]} ${FLAG_OPTS[*]} --help"
  while (($#)); do
    a=$1
    name=${a%%=*}
    if [[ $a == -- ]]; then
      shift
      train_args=("$@")
      break
    elif _in "$name" "${VALUE_OPTS[@]}"; then
      if [[ $a == *=* ]]; then
        v=${a#*=}
        shift
      else
        [[ $# -ge 2 ]] || die "$name needs a value"
        v=$2
        shift 2
      fi
      [[ -n $v ]] || die "$name needs a value"
      [[ $v != -* ]] || die "$name needs a value, got '$v' (a launcher option value may not start with '-')"
      opts+=("$name" "$v")
    elif _in "$name" "${FLAG_OPTS[@]}"; then
      [[ $a == "$name" ]] || die "$name takes no value, got '$a'"
      opts+=("$name")
      shift
    elif _in "$name" "${TRAIN_FLAGS[@]}" || [[ $name == --config.* ]]; then
      train_args=("$@")
      break
    elif [[ $a == -* ]]; then
      die "unknown option $name (launcher options: $allowed; training arguments go after \`--\` or start at --config/--workdir)"
    else
      die "unexpected argument '$a' (launcher options: $allowed; training arguments go after \`--\` or start at --config/--workdir)"
    fi
  done
  local kept=()
  for a in ${train_args[@]+"${train_args[@]}"}; do
    [[ $a == --dry-run ]] && continue
    name=${a%%=*}
    if _in "$name" "${VALUE_OPTS[@]}" "${FLAG_OPTS[@]}"; then
      die "launcher option $name is among the training arguments; put launcher options before them (before \`--\`)"
    fi
    kept+=("$a")
  done
  train_args=(${kept[@]+"${kept[@]}"})
}
# --- shared launcher helpers: end
