#!/usr/bin/env bash
# Runs one experiment on every worker of a Cloud TPU VM pod slice. jax.distributed finds the
# other hosts by itself on TPU; main.py calls it when TPU_WORKER_HOSTNAMES lists several hosts.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/vitl14_nimagenet.py gs://bucket/runs/vitl14 [overrides...]
#
# Install once per pod: the same command with SETUP=1 (clones nothing: copy the repo first, e.g.
# `gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:evclip_jax --worker=all --zone ZONE`).
set -euo pipefail
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
if [ "${SETUP:-0}" = 1 ]; then
  CMD="cd evclip_jax && pip install -e . 'jax[tpu]'"
else
  CMD="cd evclip_jax && python -m evclip_jax.main --config $CONFIG --workdir $WORKDIR $*"
fi
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$CMD"
