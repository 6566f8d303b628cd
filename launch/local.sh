#!/usr/bin/env bash
# A simulated multi-host run on one machine: NUM_PROCESSES JAX processes with
# DEVICES_PER_PROCESS CPU devices each, joined by jax.distributed over 127.0.0.1.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.FIELD=VALUE ...]
#   launch/local.sh 2 2 experiments/quickstart.py /tmp/mvit2_local --config.num_epochs=1
#
# Every process runs `python -m mvit2_jax.main --config=CONFIG --workdir=WORKDIR
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=I [flags]` with
# XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS, so the run sees
# NUM_PROCESSES x DEVICES_PER_PROCESS global devices, exactly as on several hosts. Process I
# logs to WORKDIR/logs/process_I.log. If a process fails, the others are stopped and the script
# exits with the failed process's status; SIGTERM is passed on to every process (they save a
# checkpoint and exit 143: run the same command again to resume), Ctrl-C stops them.
#
# Run it from anywhere (the repository root is put on PYTHONPATH). Environment:
#   PYTHON            interpreter (default: python)
#   COORDINATOR_PORT  port of process 0's coordinator (default: a free port)
#   JAX_PLATFORMS     default cpu: the simulation runs on CPU devices even on a GPU machine
#   JAX_ENABLE_COMPILATION_CACHE  default false. On CPU every process has its own cache key
#                     and only process 0 writes entries, so with a warm cache process 0 loads
#                     its programs while the others compile theirs; when that takes more than
#                     30 s, the first collective's gloo rendezvous times out. Without the cache
#                     all processes compile together (it costs no wall time: the others would
#                     compile anyway).
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS CONFIG WORKDIR [--config.FIELD=VALUE ...]
  e.g. launch/local.sh 2 2 experiments/quickstart.py /tmp/mvit2_local
  NUM_PROCESSES JAX processes on this machine, DEVICES_PER_PROCESS CPU devices each;
  process I logs to WORKDIR/logs/process_I.log (details: the header of launch/local.sh)
EOF
  exit 2
}

[[ $# -ge 4 ]] || usage
num_processes=$1
devices=$2
config=$3
workdir=$4
shift 4
for value in "$num_processes" "$devices"; do
  [[ $value =~ ^[1-9][0-9]*$ ]] || { echo "error: NUM_PROCESSES and DEVICES_PER_PROCESS must be positive integers, got '$value'" >&2; usage; }
done

repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python}
port=${COORDINATOR_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

# XLA_FLAGS as given, with this script's device count instead of any other.
xla_flags="--xla_force_host_platform_device_count=$devices"
read -r -a given <<<"${XLA_FLAGS:-}"
for flag in ${given[@]+"${given[@]}"}; do
  [[ $flag == --xla_force_host_platform_device_count=* ]] || xla_flags+=" $flag"
done
export XLA_FLAGS=$xla_flags
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
export JAX_ENABLE_COMPILATION_CACHE=${JAX_ENABLE_COMPILATION_CACHE:-false}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

logs="$workdir/logs"
mkdir -p "$logs"

pids=()
status=()  # exit status per process, empty while it runs
finished=0

stop_running() {  # stop_running SIGNAL GRACE_SECONDS: signal every running process, KILL after the grace time
  local signal=$1 grace=$2 i t
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [[ -z ${status[i]} ]]; then kill "-$signal" "${pids[i]}" 2>/dev/null || true; fi
  done
  for ((t = 0; t < grace; t++)); do
    collect
    if ((finished == ${#pids[@]})); then return; fi
    sleep 1
  done
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [[ -z ${status[i]} ]]; then kill -KILL "${pids[i]}" 2>/dev/null || true; fi
  done
  collect
}

collect() {  # record the exit status of every process that has ended
  local i rc
  for ((i = 0; i < ${#pids[@]}; i++)); do
    if [[ -n ${status[i]} ]] || kill -0 "${pids[i]}" 2>/dev/null; then continue; fi
    rc=0
    wait "${pids[i]}" || rc=$?
    status[i]=$rc
    finished=$((finished + 1))
  done
}

on_exit() {  # never leave a process behind (script error, unexpected exit)
  if ((finished < ${#pids[@]})); then stop_running KILL 0; fi
}
trap on_exit EXIT
trap 'echo "SIGTERM: passing it on (each process saves a checkpoint and exits 143)" >&2; stop_running TERM 300; exit 143' TERM
trap 'echo "interrupted: stopping all processes" >&2; stop_running TERM 10; exit 130' INT

echo "starting $num_processes processes x $devices devices, coordinator 127.0.0.1:$port, logs in $logs/" >&2
for ((i = 0; i < num_processes; i++)); do
  "$python" -m mvit2_jax.main --config="$config" --workdir="$workdir" \
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$i" "$@" \
    </dev/null >"$logs/process_$i.log" 2>&1 &
  pids+=("$!")
  status+=("")
done

failed=""
while ((finished < num_processes)); do
  collect
  for ((i = 0; i < num_processes; i++)); do
    if [[ -z $failed && -n ${status[i]} && ${status[i]} != 0 ]]; then
      failed=$i
      echo "process $i exited with status ${status[i]}: stopping the others; end of $logs/process_$i.log:" >&2
      tail -n 20 "$logs/process_$i.log" >&2
      stop_running TERM 10
    fi
  done
  if ((finished < num_processes)); then sleep 1; fi
done

if [[ -n $failed ]]; then
  exit "${status[failed]}"
fi
echo "all $num_processes processes finished; logs in $logs/" >&2
