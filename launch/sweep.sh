#!/usr/bin/env bash
# Run the alpha x attention sweep of experiments/sweep.py one run after another.
#   launch/sweep.sh WORKDIR_ROOT [extra --config.FIELD=VALUE flags for every run]
# Each run gets WORKDIR_ROOT/NAME; re-running the script resumes unfinished runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:?usage: launch/sweep.sh WORKDIR_ROOT [--config.FIELD=VALUE ...]}
shift
python -m experiments.sweep | while read -r name args; do
  echo "== $name"
  # shellcheck disable=SC2086
  python -m mvit2_jax.main $args --workdir="$root/$name" "$@" </dev/null
done
