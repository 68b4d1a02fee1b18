#!/usr/bin/env bash
# Runs N local processes with K fake CPU devices each, to debug the multi-host path on one
# machine: every process runs the same command with --coordinator_address on 127.0.0.1.
#
#   launch/local_multiprocess.sh 2 4 -- python -m launch.train \
#       --config=configs/default.py:runlocal --workdir=/tmp/xlps_mp
#
# Process i logs to /tmp/xlps_mp_proc{i}.log (set LOG_PREFIX to change).
set -euo pipefail
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- COMMAND..." >&2
  exit 2
fi
num_processes=$1; devices=$2; shift 3
port=${PORT:-$((20000 + RANDOM % 20000))}
prefix=${LOG_PREFIX:-/tmp/xlps_mp_proc}
echo "Running on ${num_processes} processes x ${devices} CPU devices (coordinator 127.0.0.1:${port}):"
echo "  $* --coordinator_address=127.0.0.1:${port} --num_processes=${num_processes} --process_id=I"
pids=()
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "$@" --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" \
    --process_id="${i}" >"${prefix}${i}.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process ${i} failed; see ${prefix}${i}.log" >&2
    status=1
  fi
done
[[ $status -eq 0 ]] && echo "all ${num_processes} processes finished; logs: ${prefix}*.log"
exit $status
