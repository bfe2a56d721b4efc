#!/usr/bin/env bash
# Create a Cloud TPU VM (single host, e.g. v3-8) or a pod slice (multi-host, e.g. v4-32).
# Usage: tpu/create.sh NAME ZONE ACCELERATOR [RUNTIME]
#   tpu/create.sh twindiff europe-west4-a v3-8
#   tpu/create.sh twindiff-pod us-central2-b v4-32 tpu-ubuntu2204-base
set -euo pipefail
name=${1:?name} zone=${2:?zone} accelerator=${3:?accelerator type, e.g. v3-8}
runtime=${4:-tpu-ubuntu2204-base}
gcloud compute tpus tpu-vm create "$name" --zone="$zone" \
  --accelerator-type="$accelerator" --version="$runtime"
