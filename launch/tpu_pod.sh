#!/usr/bin/env bash
# Run mvit2_jax on every worker of a Cloud TPU VM (a pod slice or a single host), over
# `gcloud compute tpus tpu-vm ssh --worker=all`.
#
#   launch/tpu_pod.sh --setup TPU_NAME ZONE REPO_URL [GIT_REF]       once per TPU VM
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
#
#   launch/tpu_pod.sh --setup my-v4-32 us-central2-b https://github.com/OWNER/mvit2_jax.git
#   launch/tpu_pod.sh my-v4-32 us-central2-b experiments/alpha_1.py gs://my-bucket/runs/mvit2_100 \
#       --config.data.data_dir=gs://my-bucket/tensorflow_datasets
#
# --setup clones the repository (or updates the clone) at the same path on every worker,
# $MVIT2_REPO_DIR (default ~/mvit2_jax; relative paths are relative to the home directory), and installs it with `pip install -r
# requirements.txt -e .` and `pip install -U "jax[tpu]"`. A run cds into that clone on every
# worker and starts `python3 -m mvit2_jax.main --config=CONFIG --workdir=WORKDIR [flags]`
# there; CONFIG is a path inside the clone. jax.distributed finds the other workers by itself
# on a TPU VM, so no coordinator flags are needed.
#
# WORKDIR must be one location that every worker sees: a gs:// bucket path (Orbax and
# TensorBoard write there directly) or a shared filesystem. The same holds for
# config.data.data_dir for datasets other than the built-in digits.
#
# The run lives as long as the ssh session: use tmux/screen on the machine you launch from.
# Running the same command again resumes from the latest checkpoint in WORKDIR. If a new run
# finds the TPU busy, a previous run is still alive on some worker: stop it first, e.g.
#   gcloud compute tpus tpu-vm ssh TPU_NAME --zone ZONE --worker=all --command "pkill -f mvit2_jax.main || true"
#
# Environment: MVIT2_REPO_DIR (clone path relative to each worker's home, default mvit2_jax),
# MVIT2_PYTHON (interpreter on the workers, default python3); gcloud's own settings apply
# (CLOUDSDK_CORE_PROJECT=... selects the project).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/tpu_pod.sh --setup TPU_NAME ZONE REPO_URL [GIT_REF]
       launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.FIELD=VALUE ...]
  e.g. launch/tpu_pod.sh my-v4-32 us-central2-b experiments/alpha_1.py gs://my-bucket/runs/mvit2_100
  WORKDIR must be shared by every worker (gs://... or a shared filesystem); details: the header of launch/tpu_pod.sh
EOF
  exit 2
}

repo_dir=${MVIT2_REPO_DIR:-mvit2_jax}
python=${MVIT2_PYTHON:-python3}

# A command line for the workers' shell, every word quoted.
quoted() {
  local line
  printf -v line '%q ' "$@"
  printf '%s' "${line% }"
}

on_all_workers() {  # on_all_workers TPU_NAME ZONE REMOTE_COMMAND
  if ! command -v gcloud >/dev/null; then
    echo "error: gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk)" >&2
    exit 2
  fi
  echo "on every worker of $1 ($2): $3" >&2
  exec gcloud compute tpus tpu-vm ssh "$1" --zone "$2" --worker=all --command "$3"
}

if [[ ${1:-} == --setup ]]; then
  [[ $# -ge 4 && $# -le 5 ]] || usage
  tpu=$2 zone=$3 url=$4 ref=${5:-}
  dir=$(quoted "$repo_dir")
  setup="set -e; cd ~"
  setup+="; if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone $(quoted "$url") $dir; fi"
  if [[ -n $ref ]]; then
    setup+="; git -C $dir checkout --quiet $(quoted "$ref")"
  else
    setup+="; git -C $dir pull --quiet --ff-only"
  fi
  setup+="; cd $dir; $(quoted "$python") -m pip install -q -r requirements.txt -e ."
  setup+="; $(quoted "$python") -m pip install -q -U 'jax[tpu]'"
  # shellcheck disable=SC2016  # expanded on the worker
  setup+='; echo "mvit2_jax installed in $PWD on $(hostname)"'
  on_all_workers "$tpu" "$zone" "$setup"
fi

[[ $# -ge 4 ]] || usage
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
if [[ $workdir != gs://* ]]; then
  echo "note: WORKDIR $workdir is not a gs:// path: it must be a filesystem shared by every worker" >&2
fi
run="cd ~ && cd $(quoted "$repo_dir") && $(quoted "$python" -m mvit2_jax.main --config="$config" --workdir="$workdir" "$@")"
on_all_workers "$tpu" "$zone" "$run"
