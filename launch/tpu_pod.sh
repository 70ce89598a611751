#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (v4 / v5p / v5e / v6e): optionally create it, ship this
# checkout (or clone a git URL) to every worker, install the pinned requirements with JAX's TPU
# extra, then run the same `python -m hidrop_jax.train ...` on all workers at once
# (`gcloud compute tpus tpu-vm ssh --worker=all`). JAX finds the other workers by itself.
#
#   launch/tpu_pod.sh --name my-v5p --zone us-east5-a [--create --accelerator-type v5p-64] \
#       -- --config configs/llava15_7b.py:schedule=tok64,dtype=bfloat16 --workdir /mnt/runs/s2
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name NAME --zone ZONE [OPTIONS] [--] TRAIN_ARGS...

Steps (each one a gcloud command; --dry-run prints them all):
  1. with --create: gcloud compute tpus tpu-vm create NAME ...
  2. ship the code to every worker: this checkout's tracked files (as in the working tree;
     untracked files are not shipped) with `tpu-vm scp --worker=all`, or `git clone` of
     --repo-url on each worker
  3. install: PYTHON -m venv .venv; pip install -r requirements.txt (pinned versions; torch is
     left out unless --with-torch: training does not use it); pip install "jax[tpu]==V" with V
     the jax pin of requirements.txt (the extra pulls the matching libtpu wheel from your
     package index); pip install --no-deps -e .
  4. run `.venv/bin/python -m hidrop_jax.train TRAIN_ARGS` on all workers (--worker=all)

Options:
  --name NAME              TPU VM name (required)
  --zone ZONE              zone (required)
  --project PROJECT        gcloud project (default: gcloud's configured one)
  --create                 create the TPU VM first
  --accelerator-type TYPE  with --create, e.g. v5p-64, v4-64, v5litepod-64, v6e-64
  --version RUNTIME        with --create: TPU software version (default from TYPE: v4 ->
                           tpu-ubuntu2204-base, v5p -> v2-alpha-tpuv5, v5litepod ->
                           v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e)
  --spot                   with --create: a Spot VM
  --repo-url URL           clone this git URL on the workers instead of copying this checkout
  --ref REF                with --repo-url: branch, tag or commit to check out (default main)
  --remote-dir DIR         code directory on each worker, relative to home (default hidrop)
  --python PY              Python >= 3.11 on the workers (default python3.11; installed with
                           apt-get when missing: Ubuntu 22.04 TPU images ship 3.10)
  --with-torch             also install torch (only the PyTorch parity tests need it)
  --skip-setup             skip steps 1-3: only run training
  --setup-only             skip step 4
  --env KEY=VALUE          set an environment variable for training (repeatable), e.g.
                           --env LIBTPU_INIT_ARGS=--xla_tpu_enable_async_all_gather=true
  --detach                 run training under nohup (log: ~/DIR/train.log on each worker), so
                           it survives the end of the ssh session
  --dry-run                print the exact commands instead of running them
  -h, --help               this help

TRAIN_ARGS go to `python -m hidrop_jax.train` on every worker. Paths in them are seen from each
worker: --workdir must be on storage every worker shares at the same path (Filestore/NFS, or a
bucket mounted with gcsfuse), because checkpoints are written by all workers together. See
launch/README.md.

EOF
  echo "$ARG_RULE"
}

SCRIPT=launch/tpu_pod.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
name=""
zone=""
project=""
create=0
accel=""
version=""
spot=0
repo_url=""
ref=main
remote_dir=hidrop
python=python3.11
with_torch=0
skip_setup=0
setup_only=0
detach=0
train_env=()

VALUE_OPTS=(--name --zone --project --accelerator-type --version --repo-url --ref --remote-dir
  --python --env)
FLAG_OPTS=(--create --spot --with-torch --skip-setup --setup-only --detach --dry-run)
split_args "$@"
set -- ${opts[@]+"${opts[@]}"}
while (($#)); do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --accelerator-type) accel=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --repo-url) repo_url=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --remote-dir) remote_dir=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --env) train_env+=("$2"); shift 2 ;;
    --create) create=1; shift ;;
    --spot) spot=1; shift ;;
    --with-torch) with_torch=1; shift ;;
    --skip-setup) skip_setup=1; shift ;;
    --setup-only) setup_only=1; shift ;;
    --detach) detach=1; shift ;;
    *) shift ;;  # --dry-run: split_args set dry_run
  esac
done

[[ -n $name ]] || die "--name is required (see --help)"
[[ -n $zone ]] || die "--zone is required (see --help)"
((skip_setup && setup_only)) && die "--skip-setup and --setup-only exclude each other"
((skip_setup && create)) && die "--create needs the setup steps; drop --skip-setup"
((setup_only || ${#train_args[@]})) || die "no TRAIN_ARGS (at least --config and --workdir); see --help"
[[ $remote_dir =~ ^[A-Za-z0-9_./-]+$ && $remote_dir != /* ]] || die "--remote-dir must be a plain relative path"
[[ $python =~ ^python3(\.[0-9]+)?$ ]] || die "--python must look like python3.11, got '$python'"
for kv in "${train_env[@]}"; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env wants KEY=VALUE, got '$kv'"
done
if ((create)); then
  [[ -n $accel ]] || die "--create needs --accelerator-type (e.g. v5p-64)"
  if [[ -z $version ]]; then
    case $accel in
      v4-*) version=tpu-ubuntu2204-base ;;
      v5p-*) version=v2-alpha-tpuv5 ;;
      v5litepod-*) version=v2-alpha-tpuv5-lite ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      *) die "no default --version for accelerator type '$accel'; give --version" ;;
    esac
  fi
fi

jax_version=$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$REPO/requirements.txt")
[[ -n $jax_version ]] || die "no 'jax==' pin in $REPO/requirements.txt"

common=(--zone="$zone")
[[ -n $project ]] && common+=(--project="$project")

run() {  # print, or run, one local command
  if ((dry_run)); then
    quote_cmd "$@"; echo
  else
    echo "+ $(quote_cmd "$@")" >&2
    "$@"
  fi
}

on_all_workers() {  # one shell command string, run on every worker at once
  run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$1"
}

rdir=$(q "$remote_dir")

if ((!skip_setup)); then
  # 1. create
  if ((create)); then
    create_cmd=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
      --accelerator-type="$accel" --version="$version")
    ((spot)) && create_cmd+=(--spot)
    run "${create_cmd[@]}"
  fi

  # 2. code
  if [[ -n $repo_url ]]; then
    on_all_workers "set -e; if [ -d $rdir/.git ]; then git -C $rdir fetch --quiet origin; \
else git clone --quiet $(q "$repo_url") $rdir; fi; git -C $rdir checkout --quiet $(q "$ref")"
  else
    git -C "$REPO" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$REPO is not a git checkout; use --repo-url"
    # The working tree's tracked files: `git stash create` makes a commit of them without
    # touching the checkout (it prints nothing when the tree is clean: then HEAD).
    tree=$(git -C "$REPO" stash create)
    tree=${tree:-HEAD}
    tarball=${TMPDIR:-/tmp}/hidrop_src_$name.tar.gz
    run git -C "$REPO" archive --format=tar.gz --output="$tarball" "$tree"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:hidrop_src.tar.gz" "${common[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $rdir; tar -xzf hidrop_src.tar.gz -C $rdir; rm hidrop_src.tar.gz"
  fi

  # 3. install
  if ((with_torch)); then
    reqs=requirements.txt
  else
    reqs=.venv/requirements-no-torch.txt
  fi
  setup="set -e; cd $rdir; \
if ! $python -c 'import ensurepip' >/dev/null 2>&1; then \
sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; fi; \
[ -x .venv/bin/python ] || $python -m venv .venv; \
.venv/bin/pip install -q --upgrade pip; "
  ((with_torch)) || setup+="grep -v '^torch==' requirements.txt > $reqs; "
  setup+=".venv/bin/pip install -q -r $reqs; \
.venv/bin/pip install -q $(q "jax[tpu]==$jax_version"); \
.venv/bin/pip install -q --no-deps -e .; \
.venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count())'"
  on_all_workers "$setup"
fi

# 4. train
if ((!setup_only)); then
  train=(.venv/bin/python -m hidrop_jax.train --distributed "${train_args[@]}")
  ((${#train_env[@]})) && train=(env "${train_env[@]}" "${train[@]}")
  if ((detach)); then
    on_all_workers "cd $rdir && nohup $(quote_cmd "${train[@]}") > train.log 2>&1 < /dev/null &"
  else
    on_all_workers "cd $rdir && $(quote_cmd "${train[@]}")"
  fi
fi
