#!/usr/bin/env bash
# Delete a TPU VM or pod slice: its billing stops, and its disks, with anything not copied off,
# are gone.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
PROG=tpu/delete.sh
USAGE="usage: $PROG NAME ZONE [--project PROJECT] [--dry-run]
Delete the TPU VM or pod slice NAME in ZONE without asking (gcloud --quiet), e.g.
  $PROG twindiff europe-west4-a
Copy the results off first (tpu/copy.sh), unless the run wrote them to Cloud Storage.
--project    the Google Cloud project (default: gcloud's configured one)
--dry-run    print the gcloud command, run nothing"
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positional=()
while (($#)); do
  if common_option "$@"; then
    shift "$SHIFT" && continue
  fi
  case $1 in
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") && shift ;;
  esac
done
((${#positional[@]} <= 2)) || usage_error "too many arguments: ${positional[2]}"
check_positional NAME "${positional[0]:-}"
check_positional ZONE "${positional[1]:-}"

gcloud_tpu delete "${positional[0]}" --zone="${positional[1]}" --quiet
