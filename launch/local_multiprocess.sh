#!/usr/bin/env bash
# Runs N local processes with K fake CPU devices each, to debug the multi-host path on one
# machine: every process runs the same command with --coordinator_address on 127.0.0.1.
#
#   launch/local_multiprocess.sh 2 4 -- python -m launch.train \
#       --config=configs/default.py:runlocal --workdir=/tmp/xlps_mp
#
# Process i logs to /tmp/xlps_mp_proc{i}.log (set LOG_PREFIX to change); its pid is printed
# as "process i: pid P".
#
# Failures, as on a pod: SIGTERM (or Ctrl-C) to this script is sent to every process
# (a preemption: they agree on one step, save a checkpoint there and exit 0); a process that
# dies makes the others abort within --heartbeat_timeout_seconds (launch.train, default 60 s).
# The script exits 0 when every process did, else 1 after naming each failed process (the
# first one listed failed first).
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
declare -A index_of
forward() {  # a trapped signal interrupts `wait` below, which then waits again
  echo "forwarding SIG$1 to processes ${pids[*]}" >&2
  kill -s "$1" "${pids[@]}" 2>/dev/null || true
}
# SIGINT too becomes a SIGTERM: background processes of a script ignore SIGINT.
trap 'forward TERM' TERM INT
for ((i = 0; i < num_processes; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices}" JAX_PLATFORMS=cpu \
    "$@" --coordinator_address="127.0.0.1:${port}" --num_processes="${num_processes}" \
    --process_id="${i}" >"${prefix}${i}.log" 2>&1 &
  pids+=($!)
  index_of[$!]=$i
  echo "process ${i}: pid $!"
done
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  unset done_pid
  wait -n -p done_pid "${running[@]}" && rc=0 || rc=$?
  [[ -n "${done_pid:-}" ]] || continue  # interrupted by a forwarded signal
  left=()
  for pid in "${running[@]}"; do [[ "$pid" == "$done_pid" ]] || left+=("$pid"); done
  running=("${left[@]+"${left[@]}"}")
  i=${index_of[$done_pid]}
  if ((rc != 0)); then
    why=""
    ((rc == 134)) && why=" (aborted: usually 'another task died', see the first failure)"
    ((rc > 128 && rc != 134)) && why=" (killed by signal $((rc - 128)))"
    echo "process ${i} failed with exit status ${rc}${why}; see ${prefix}${i}.log" >&2
    status=1
  fi
done
if [[ $status -eq 0 ]]; then
  echo "all ${num_processes} processes finished; logs: ${prefix}*.log"
fi
exit $status
