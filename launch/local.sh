#!/usr/bin/env bash
# Train on this machine: one process (all local devices), or N local processes joined by
# jax.distributed through a coordinator on 127.0.0.1 (a smoke test of the multi-host path).
#
#   launch/local.sh [OPTIONS] [--] TRAIN_ARGS...
#
# TRAIN_ARGS go to `python -m hidrop_jax.train` unchanged, e.g.
#   launch/local.sh --config configs/tiny_shapes.py:schedule=tok64 --workdir runs/tiny
#   launch/local.sh --procs 2 --cpu-devices 2 -- --config configs/tiny_shapes.py:schedule=tok64 \
#       --workdir runs/tiny2 --config.train.mesh='(1,-1,1)' --config.train.steps=20
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/local.sh [OPTIONS] [--] TRAIN_ARGS...

Runs `python -m hidrop_jax.train TRAIN_ARGS` on this machine.

Options:
  --procs N          start N processes (default 1). With N > 1 each gets
                     --coordinator=127.0.0.1:PORT --num_processes=N --process_id=i; they share
                     the --workdir (as hosts of a pod share a filesystem). Process 0 prints to
                     the terminal, process i > 0 to LOGDIR/process_i.log; if one fails, the
                     others are stopped.
  --port P           coordinator port for --procs > 1 (default 12355)
  --cpu-devices K    run on the CPU with K simulated devices per process (JAX_PLATFORMS=cpu,
                     XLA_FLAGS=--xla_force_host_platform_device_count=K, and gloo CPU
                     collectives when --procs > 1). Default: JAX picks the platform.
  --logdir DIR       where processes 1..N-1 write their logs (default: ${TMPDIR:-/tmp}/hidrop_local_PORT)
  --python PY        the interpreter (default: $PYTHON, else REPO/.venv/bin/python)
  --dry-run          print the exact commands instead of running them
  -h, --help         this help

A --workdir that holds a checkpoint resumes from it. With --procs > 1 the launcher adds
--coordinator/--num_processes/--process_id itself: giving them too is an error.

EOF
  echo "$ARG_RULE"
}

SCRIPT=launch/local.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-$REPO/.venv/bin/python}
procs=1
port=12355
cpu_devices=0
logdir=""

VALUE_OPTS=(--procs --port --cpu-devices --logdir --python)
FLAG_OPTS=(--dry-run)
split_args "$@"
set -- ${opts[@]+"${opts[@]}"}
while (($#)); do
  case $1 in
    --procs) procs=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --cpu-devices) cpu_devices=$2; shift 2 ;;
    --logdir) logdir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    *) shift ;;  # --dry-run: split_args set dry_run
  esac
done

[[ $procs =~ ^[1-9][0-9]*$ ]] || die "--procs must be a positive integer, got '$procs'"
if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
  die "--port must be 1..65535, got '$port'"
fi
[[ $cpu_devices =~ ^[0-9]+$ ]] || die "--cpu-devices must be a non-negative integer, got '$cpu_devices'"
((${#train_args[@]})) || die "no TRAIN_ARGS (at least --config and --workdir); see --help"
if ((procs > 1)); then
  for a in "${train_args[@]}"; do
    case ${a%%=*} in
      --coordinator | --num_processes | --process_id)
        die "${a%%=*} is set by --procs $procs; drop it from the training arguments" ;;
    esac
  done
fi

env_vars=()
if ((cpu_devices > 0)); then
  env_vars+=(JAX_PLATFORMS=cpu
    "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices")
  ((procs > 1)) && env_vars+=(JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo)
fi

# The command of process $1 in the global array `cmd`.
build_cmd() {
  cmd=()
  ((${#env_vars[@]})) && cmd+=(env "${env_vars[@]}")
  cmd+=("$python" -m hidrop_jax.train "${train_args[@]}")
  if ((procs > 1)); then
    cmd+=("--coordinator=127.0.0.1:$port" "--num_processes=$procs" "--process_id=$1")
  fi
}

if ((procs == 1)); then
  build_cmd 0
  if ((dry_run)); then
    quote_cmd "${cmd[@]}"; echo
    exit 0
  fi
  exec "${cmd[@]}"
fi

logdir=${logdir:-${TMPDIR:-/tmp}/hidrop_local_$port}

if ((dry_run)); then
  for ((i = 0; i < procs; i++)); do
    build_cmd "$i"
    if ((i == 0)); then
      echo "$(quote_cmd "${cmd[@]}") &"
    else
      echo "$(quote_cmd "${cmd[@]}") > $(q "$logdir/process_$i.log") 2>&1 &"
    fi
  done
  echo "wait"
  exit 0
fi

mkdir -p "$logdir"
echo "launch/local.sh: $procs processes, coordinator 127.0.0.1:$port; logs of processes 1..$((procs - 1)) in $logdir" >&2
pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < procs; i++)); do
  build_cmd "$i"
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$logdir/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done
status=0
for ((i = 0; i < procs; i++)); do
  rc=0
  wait -n || rc=$?
  if ((rc != 0 && status == 0)); then
    status=$rc
    echo "launch/local.sh: a process exited with status $rc; stopping the others (logs: $logdir)" >&2
    stop_all
  fi
done
exit "$status"
