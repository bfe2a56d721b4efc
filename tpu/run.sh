#!/usr/bin/env bash
# Run one command on all workers of a TPU VM or pod slice at once, inside twindiff's virtualenv.
# Every worker must start the same program: JAX's multi-host runtime connects them.
# Usage: tpu/run.sh NAME ZONE -- python -m flaxdiff.dreambooth --config tasks/dreambooth.yaml
set -euo pipefail
name=${1:?name} zone=${2:?zone}
shift 2
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: tpu/run.sh NAME ZONE -- COMMAND..." >&2; exit 2; }
command=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command "
  cd twindiff && . ~/twindiff-venv/bin/activate && $command
"
