#!/usr/bin/env bash
# Run lmx on a Cloud TPU VM slice (every worker runs the same command; jax.distributed auto-detects the pod).
#
#   launch/tpu_vm.sh create               # create the TPU VM slice
#   launch/tpu_vm.sh copy                 # copy this checkout to every worker
#   launch/tpu_vm.sh install              # venv + pip install -e .[tpu] on every worker
#   launch/tpu_vm.sh run --config=configs/datm.py:cifar10_ipc10 --workdir=gs://BUCKET/datm/c10
#   launch/tpu_vm.sh all  --config=...    # create, copy, install, run
#   launch/tpu_vm.sh delete
#
# Settings (environment): TPU_NAME, ZONE, ACCEL (e.g. v5litepod-16), RUNTIME (TPU software version), PROJECT.
set -euo pipefail
TPU_NAME=${TPU_NAME:-lmx}
ZONE=${ZONE:-us-central2-b}
ACCEL=${ACCEL:-v4-32}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
REMOTE_DIR=${REMOTE_DIR:-lmx}

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

cmd=${1:-}; shift || true
case "$cmd" in
  create)  tpu create "$TPU_NAME" --accelerator-type="$ACCEL" --version="$RUNTIME" ;;
  copy)    on_all "mkdir -p ~/$REMOTE_DIR"
           tpu scp --recurse --worker=all ./setup.py ./README.md ./lmx ./configs ./launch "$TPU_NAME:~/$REMOTE_DIR/" ;;
  install) on_all "cd ~/$REMOTE_DIR && python3 -m venv ~/lmx-venv && ~/lmx-venv/bin/pip install -q -U pip && ~/lmx-venv/bin/pip install -q -e '.[tpu]'" ;;
  run)     args=$(printf ' %q' "$@")
           on_all "cd ~/$REMOTE_DIR && LMX_DISTRIBUTED=1 ~/lmx-venv/bin/python launch/run.py$args" ;;
  all)     "$0" create; "$0" copy; "$0" install; "$0" run "$@" ;;
  delete)  tpu delete "$TPU_NAME" --quiet ;;
  *)       sed -n '2,13p' "$0"; exit 2 ;;
esac
