#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM and runs the same training command on every worker.
#
#   TPU_NAME=xlps-v4-32 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config=configs/albert.py:base --workdir=gs://BUCKET/albert_base
#
# Prints every gcloud command before running it; DRY_RUN=1 only prints them.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/xlps/xlps.git}
BRANCH=${BRANCH:-main}

run() {
  echo "+ $*"
  [[ "${DRY_RUN:-0}" == "1" ]] || "$@"
}

if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
    --accelerator-type="$ACCELERATOR" --version="$VERSION"
fi
setup="test -d xlps || git clone --branch $BRANCH $REPO xlps; cd xlps && git pull --ff-only && \
python3 -m venv .venv && .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]'"
train="cd xlps && .venv/bin/python -m launch.train --distributed $*"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$setup"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$train"
