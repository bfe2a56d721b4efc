#!/usr/bin/env bash
# Install twindiff with the TPU build of JAX on every worker of a TPU VM or pod slice.
# Usage: tpu/setup.sh NAME ZONE [GIT_URL] [REF]
set -euo pipefail
name=${1:?name} zone=${2:?zone}
url=${3:-https://github.com/twindiff/twindiff.git} ref=${4:-main}
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  set -e
  [ -d twindiff ] || git clone '$url' twindiff
  cd twindiff && git fetch -q origin '$ref' && git checkout -q FETCH_HEAD
  python3 -m venv ~/twindiff-venv && . ~/twindiff-venv/bin/activate
  pip install -q -U pip && pip install -q -e '.[flax,tpu,data]'
  python -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'
"
