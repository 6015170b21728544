#!/usr/bin/env bash
# N processes of one run on this machine, joined through config.distributed (coordinator on
# localhost): the multi-process path of a TPU pod or GPU cluster, on one host. On a GPU machine
# process i sees only its own GPUs (CUDA_VISIBLE_DEVICES), one each by default.
#
#   launch/local_multiprocess.sh 2 configs/vitb32_nimagenet.py /runs/b32 [--config.x=y ...]
#
# Environment: PYTHON (default python), PORT (coordinator port; default a free one),
# GPUS_PER_PROCESS (default 1 when nvidia-smi lists GPUs, else 0: leave devices alone),
# LOG_DIR (default a new temp dir): process_<i>.log and process_<i>.pid of each process.
# SIGTERM or Ctrl-C is passed on to every process (they save a checkpoint and stop); the exit
# status is the first non-zero one of the processes.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_PROCESSES CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
N=$1 CONFIG=$2 WORKDIR=$3
shift 3
PYTHON=${PYTHON:-python}
PORT=${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
if [ -z "${GPUS_PER_PROCESS:-}" ]; then
  GPUS_PER_PROCESS=$( (nvidia-smi -L 2>/dev/null | grep -q '^GPU') && echo 1 || echo 0)
fi
LOG_DIR=${LOG_DIR:-$(mktemp -d -t evclip_local.XXXXXX)}
mkdir -p "$LOG_DIR"

pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop TERM INT

for ((i = 0; i < N; i++)); do
  env=()
  if [ "$GPUS_PER_PROCESS" -gt 0 ]; then
    gpus=$(seq -s, $((i * GPUS_PER_PROCESS)) $(((i + 1) * GPUS_PER_PROCESS - 1)))
    env=(CUDA_VISIBLE_DEVICES="$gpus")
  fi
  env "${env[@]}" "$PYTHON" -m evclip_jax.main --config "$CONFIG" --workdir "$WORKDIR" \
    --config.distributed.coordinator_address="localhost:$PORT" \
    --config.distributed.num_processes="$N" --config.distributed.process_id="$i" "$@" \
    >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
  echo $! >"$LOG_DIR/process_$i.pid"
done
echo "$N processes on localhost:$PORT; logs in $LOG_DIR" >&2

status=0
for ((i = 0; i < N; i++)); do
  # wait returns early when a trapped signal arrives: wait again until the process is gone.
  while true; do
    set +e
    wait "${pids[$i]}"
    rc=$?
    set -e
    kill -0 "${pids[$i]}" 2>/dev/null || break
  done
  if [ "$rc" -ne 0 ]; then
    echo "process $i exited with status $rc; the end of $LOG_DIR/process_$i.log:" >&2
    tail -n 20 "$LOG_DIR/process_$i.log" >&2
    [ "$status" -ne 0 ] || status=$rc
  fi
done
exit "$status"
