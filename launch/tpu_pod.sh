#!/bin/bash
# Train on a Cloud TPU VM pod slice: the same command on every worker, started with
# gcloud's --worker=all. jax.distributed.initialize() discovers the pod by itself.
# The dataset and workdir must be on storage every worker reads (e.g. gs:// buckets).
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/iap_dataset gs://bucket/runs/r1 [--config.key=value ...]
#
# The repository is expected at ~/iap-jax on every worker (copy it with
# `gcloud compute tpus tpu-vm scp --recurse . TPU_NAME:~/iap-jax --worker=all`) and
# installed with `pip install -e ~/iap-jax`.
#
# Preemption: a maintenance event or spot preemption sends SIGTERM; JAX's preemption service
# makes every worker save the same step (Orbax's CheckpointManager.reached_preemption) and
# exit with status 75. Run this command again, with the same arguments, to resume from the
# checkpoint in WORKDIR on any pod shape whose worker count divides input.logical_shards.
set -euo pipefail
TPU_NAME=${1:?usage: tpu_pod.sh TPU_NAME ZONE DATASET_DIR WORKDIR [flags]}
ZONE=${2:?}
DATASET_DIR=${3:?}
WORKDIR=${4:?}
shift 4
EXTRA_FLAGS=""
if [ $# -gt 0 ]; then EXTRA_FLAGS=$(printf ' %q' "$@"); fi  # quoted for the remote shell
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  cd ~/iap-jax && python -m iap_jax.training.train_cli \
    --config=configs/tpu_pod.py \
    --workdir='$WORKDIR' \
    --config.dataset_dir='$DATASET_DIR' \
    --config.distributed.cpu_collectives='' \
   $EXTRA_FLAGS"
