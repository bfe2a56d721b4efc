#!/usr/bin/env bash
# Create a Cloud TPU VM (one host, e.g. v3-8) or a pod slice (several hosts, e.g. v4-32).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
PROG=tpu/create.sh
USAGE="usage: $PROG NAME ZONE ACCELERATOR [--version RUNTIME] [--spot | --preemptible]
                      [--project PROJECT] [--dry-run]
Create the TPU VM or pod slice NAME in ZONE, e.g.
  $PROG twindiff europe-west4-a v3-8
  $PROG twindiff-pod us-central2-b v4-32 --spot
ACCELERATOR  v3-8, v4-8, v4-32, v5p-8, v5litepod-8, v6e-8, ...
--version    TPU software version; default by generation: tpu-ubuntu2204-base (v2, v3, v4),
             v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p), v2-alpha-tpuv6e (v6e)
--spot       a Spot TPU: much cheaper, may be preempted at any time (then delete and recreate)
--preemptible  the older preemptible kind (preempted at least once a day)
--project    the Google Cloud project (default: gcloud's configured one)
--dry-run    print the gcloud command, run nothing"
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positional=() version="" provisioning=()
while (($#)); do
  if common_option "$@"; then
    shift "$SHIFT" && continue
  fi
  case $1 in
    --version | --version=*) take_value version "$@" && shift "$SHIFT" ;;
    --spot | --preemptible)
      ((${#provisioning[@]} == 0)) || usage_error "give only one of --spot and --preemptible"
      provisioning=("$1") && shift
      ;;
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") && shift ;;
  esac
done
((${#positional[@]} <= 3)) || usage_error "too many arguments: ${positional[3]}"
check_positional NAME "${positional[0]:-}"
check_positional ZONE "${positional[1]:-}"
[[ -n ${positional[2]:-} ]] || usage_error "missing ACCELERATOR (e.g. v3-8)"
name=${positional[0]} zone=${positional[1]} accelerator=${positional[2]}
check_accelerator "$accelerator"
version=${version:-$(default_runtime "$accelerator")}
[[ -n $version ]] || usage_error "no default runtime for $accelerator: pass --version"

gcloud_tpu create "$name" --zone="$zone" --accelerator-type="$accelerator" \
  --version="$version" ${provisioning[@]+"${provisioning[@]}"}
