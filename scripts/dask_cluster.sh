#!/usr/bin/env bash
# A local Dask cluster for the pipelines' --runner DaskRunner: one scheduler and N single-threaded
# worker processes on 127.0.0.1, each its own OS process talking TCP, as on a Slurm/PBS or
# Kubernetes cluster.
#
#   scripts/dask_cluster.sh start N   # starts them, waits until N workers are up, prints the address
#   scripts/dask_cluster.sh stop      # stops them by PID (scheduler last)
#   scripts/dask_cluster.sh address   # the scheduler's address, for --dask_client_address
#
# State (PIDs, the scheduler file, logs) lives in $EPEE_DASK_DIR (default .dask-cluster/ in the
# checkout). The scheduler takes a free port unless EPEE_DASK_PORT is set. Workers run the
# project's environment ($EPEE_VENV, default .venv) with HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${EPEE_VENV:-.venv}"
DIR="${EPEE_DASK_DIR:-$ROOT/.dask-cluster}"
PORT="${EPEE_DASK_PORT:-0}"
WAIT_S="${EPEE_DASK_WAIT_S:-90}"
PY="$VENV/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONHASHSEED="${PYTHONHASHSEED:-0}"
# the workers import the project's code (installed editable by scripts/setup_env.sh) from the checkout
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  [ -d "$DIR" ] || return 0
  local f
  for f in "$DIR"/worker-*.pid "$DIR"/scheduler.pid; do
    [ -f "$f" ] || continue
    local pid
    pid="$(cat "$f")"
    # each process leads its own process group (setsid): the nanny and the worker it forked go together
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 50); do
    local left=0
    for f in "$DIR"/worker-*.pid "$DIR"/scheduler.pid; do alive "$f" && left=1; done
    [ "$left" = 0 ] && break
    sleep 0.2
  done
  for f in "$DIR"/worker-*.pid "$DIR"/scheduler.pid; do
    [ -f "$f" ] || continue
    kill -KILL -- "-$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  rm -f "$DIR/scheduler.json" "$DIR/address"
}

start() {
  local n="$1"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "usage: $0 start N (N >= 1 workers)" >&2; exit 2; }
  [ -x "$PY" ] || { echo "no $PY: run scripts/setup_env.sh first" >&2; exit 1; }
  if alive "$DIR/scheduler.pid"; then
    echo "a cluster is already running from $DIR (scheduler pid $(cat "$DIR/scheduler.pid")): stop it first" >&2
    exit 1
  fi
  stop
  mkdir -p "$DIR"
  setsid "$PY" -m distributed.cli.dask_scheduler --host 127.0.0.1 --port "$PORT" --no-dashboard \
    --scheduler-file "$DIR/scheduler.json" >"$DIR/scheduler.log" 2>&1 &
  echo $! >"$DIR/scheduler.pid"
  for _ in $(seq $((WAIT_S * 5))); do
    [ -s "$DIR/scheduler.json" ] && break
    alive "$DIR/scheduler.pid" || { echo "the Dask scheduler exited: see $DIR/scheduler.log" >&2; tail -5 "$DIR/scheduler.log" >&2; exit 1; }
    sleep 0.2
  done
  # Dask's nanny gives each worker MALLOC_TRIM_THRESHOLD_=65536 and one OpenMP thread: the first
  # made the model's steps 1.5x slower here (freed tensors go back to the OS and fault in again;
  # our handler trims the heap itself, --heap_trim_seconds), the second leaves cores idle with
  # fewer workers than cores. Each worker gets its share of the cores (--torch_threads overrides).
  local threads=$(( $(nproc) / n )); [ "$threads" -ge 1 ] || threads=1
  export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="{'MALLOC_TRIM_THRESHOLD_': None, 'OMP_NUM_THREADS': $threads, 'MKL_NUM_THREADS': $threads, 'OPENBLAS_NUM_THREADS': $threads}"
  local i
  for i in $(seq "$n"); do
    setsid "$PY" -m distributed.cli.dask_worker --scheduler-file "$DIR/scheduler.json" --host 127.0.0.1 \
      --nworkers 1 --nthreads 1 --no-dashboard --name "epee-worker-$i" --local-directory "$DIR/worker-$i" \
      >"$DIR/worker-$i.log" 2>&1 &
    echo $! >"$DIR/worker-$i.pid"
  done
  if ! "$PY" - "$DIR/scheduler.json" "$n" "$WAIT_S" <<'EOF'
import sys
from dask.distributed import Client

scheduler_file, n, wait_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
with Client(scheduler_file=scheduler_file, timeout=wait_s) as client:
    client.wait_for_workers(n, timeout=wait_s)
    print(client.scheduler.address)
EOF
  then
    echo "the Dask cluster did not come up within ${WAIT_S}s: see $DIR/*.log" >&2
    stop
    exit 1
  fi
  "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["address"])' "$DIR/scheduler.json" >"$DIR/address"
  echo "Dask cluster: scheduler $(cat "$DIR/address"), $n worker process(es); stop with $0 stop" >&2
}

case "${1:-}" in
  start) start "${2:-2}" >/dev/null; cat "$DIR/address" ;;
  stop) stop ;;
  address) [ -s "$DIR/address" ] && cat "$DIR/address" || { echo "no cluster running from $DIR" >&2; exit 1; } ;;
  *) echo "usage: $0 start N | stop | address" >&2; exit 2 ;;
esac
