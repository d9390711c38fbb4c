#!/usr/bin/env bash
# N processes of one JAX program on this machine, talking over 127.0.0.1: the way to try the
# multi-host path on a laptop or a CPU box, and what the tests use.
#
#   launch/local.sh N COMMAND [ARGS...]
#   launch/local.sh 2 python -m abaw_jax.main --config=configs/va.py --workdir=/tmp/va2
#
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (read by
# abaw_jax.parallel.initialize) and LOCAL_DEVICES fake CPU devices (default 2). Output lines are
# prefixed with [pI]. SIGTERM and Ctrl-C are forwarded to every process as SIGTERM (as SLURM does
# on preemption); the exit status is the first non-zero status of the processes, else 0.
set -u -o pipefail

if [[ $# -lt 2 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N COMMAND [ARGS...]   (N processes on 127.0.0.1)" >&2
  exit 2
fi
n=$1
shift
# XLA:CPU train steps take ~1.4x as long on glibc malloc as on tcmalloc (README, "Speed on
# CPU"): preload it when installed, unless LD_PRELOAD is set (an empty LD_PRELOAD= keeps glibc).
if [[ -z "${LD_PRELOAD+set}" ]] && ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then
  export LD_PRELOAD=libtcmalloc_minimal.so.4
fi
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
devices=${LOCAL_DEVICES:-2}

pids=()
for ((i = 0; i < n; i++)); do
  JAX_COORDINATOR_ADDRESS=127.0.0.1:$port JAX_NUM_PROCESSES=$n JAX_PROCESS_ID=$i \
    JAX_PLATFORMS=${JAX_PLATFORMS:-cpu} \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices ${LOCAL_XLA_FLAGS:-}" \
    "$@" > >(sed -u "s/^/[p$i] /") 2> >(sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

got_signal=0
forward() {
  got_signal=1
  echo "local.sh: forwarding SIG$1 to ${pids[*]}" >&2
  kill -"$1" "${pids[@]}" 2>/dev/null
}
# Ctrl-C becomes SIGTERM for the processes: background jobs of a script ignore SIGINT, and
# SIGTERM is what makes them save a checkpoint at an agreed step and exit 0.
trap 'forward TERM' TERM INT

status=0
for pid in "${pids[@]}"; do
  while true; do
    got_signal=0
    wait "$pid"
    rc=$?
    # A trapped signal ends `wait` early (status > 128): wait again for the real exit.
    [[ $got_signal -eq 1 ]] || break
  done
  if [[ $rc -ne 0 && $status -eq 0 ]]; then status=$rc; fi
done
wait  # the output filters
exit $status
