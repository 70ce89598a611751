# Helpers shared by launch/local.sh and launch/tpu_pod.sh (sourced; set SCRIPT first).
# slurm_gpu.sbatch keeps its own copy: sbatch runs a spool copy that cannot find this file.

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

need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
