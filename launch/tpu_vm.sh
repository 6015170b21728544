#!/usr/bin/env bash
# One run on a Cloud TPU VM slice, start to end: create the slice, copy this checkout to every
# worker and install it, mount the GCS bucket(s) of the config and the workdir, run
# `python -m evclip_jax.main` on all workers at once (--worker=all: one JAX process per host,
# joined through the TPU metadata), then delete the slice. The workdir is on GCS, so running the
# same command again resumes a preempted or failed run from its last complete checkpoint.
#
#   launch/tpu_vm.sh NAME ZONE ACCELERATOR CONFIG WORKDIR [main.py flags...]
#   launch/tpu_vm.sh evclip-l14 us-central2-b v4-32 \
#       gs://my-bucket/configs/vitl14_nimagenet.py:bf16 gs://my-bucket/runs/vitl14 \
#       --config.data.dir=/gcs/my-bucket/nimagenet
#
# gs://BUCKET/path is /gcs/BUCKET/path on the workers (gcsfuse); give data dirs in flags in that
# form. A CONFIG that is not on GCS is a path inside this checkout (configs/x.py).
# Environment: VERSION (TPU software, default tpu-ubuntu2204-base), SPOT=1 (a spot slice),
# KEEP=1 (leave the slice up at the end).
set -euo pipefail
if [ $# -lt 5 ]; then
  echo "usage: $0 NAME ZONE ACCELERATOR CONFIG WORKDIR [main.py flags...]" >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3 CONFIG=$4 WORKDIR=$5
shift 5
VERSION=${VERSION:-tpu-ubuntu2204-base}
case "$WORKDIR" in
  gs://*) ;;
  *) echo "WORKDIR=$WORKDIR: expected gs://BUCKET/path (the slice is deleted at the end)" >&2
     exit 2 ;;
esac

on_workers() { # gs://b/p -> /gcs/b/p
  case "$1" in gs://*) echo "/gcs/${1#gs://}" ;; *) echo "$1" ;; esac
}
buckets=$(for p in "$CONFIG" "$WORKDIR"; do
  case "$p" in gs://*) p=${p#gs://}; echo "${p%%/*}" ;; esac
done | sort -u)

tpu() {
  local verb=$1
  shift
  gcloud compute tpus tpu-vm "$verb" "$@" --zone="$ZONE"
}

spot=()
[ "${SPOT:-0}" = 1 ] && spot=(--spot)
tpu create "$NAME" --accelerator-type="$ACCELERATOR" --version="$VERSION" "${spot[@]}"
if [ "${KEEP:-0}" != 1 ]; then
  trap 'tpu delete "$NAME" --quiet' EXIT
fi

# The checkout as it is here (tracked and untracked files, not the ignored ones).
archive=$(mktemp -t evclip_jax.XXXXXX.tgz)
git -C "$(dirname "$0")/.." ls-files -z -co --exclude-standard \
  | tar -czf "$archive" -C "$(dirname "$0")/.." --null -T -
tpu scp "$archive" "$NAME:evclip_jax.tgz" --worker=all
rm -f "$archive"

setup="set -e; mkdir -p ~/evclip_jax; tar -xzf ~/evclip_jax.tgz -C ~/evclip_jax"
setup+="; python3 -m pip install -q -e ~/evclip_jax 'jax[tpu]>=0.6,<0.12'"
setup+="; if ! command -v gcsfuse >/dev/null; then"
setup+=" curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
setup+=" | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null"
setup+="; echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc]"
setup+=" https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\""
setup+=" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
setup+="; sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi"
for b in $buckets; do
  setup+="; sudo mkdir -p /gcs/$b && sudo chown \$USER /gcs/$b"
  setup+="; mountpoint -q /gcs/$b || gcsfuse --implicit-dirs $b /gcs/$b"
done
tpu ssh "$NAME" --worker=all --command="$setup"

args=(--config="$(on_workers "$CONFIG")" --workdir="$(on_workers "$WORKDIR")"
      --config.distributed.enabled=on "$@")
tpu ssh "$NAME" --worker=all \
  --command="cd ~/evclip_jax && python3 -m evclip_jax.main $(printf '%q ' "${args[@]}")"
