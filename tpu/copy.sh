#!/usr/bin/env bash
# Copy a folder (a run's output) from worker 0 of a TPU VM or pod slice to this machine.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
PROG=tpu/copy.sh
USAGE="usage: $PROG NAME ZONE REMOTE [LOCAL] [--worker N] [--project PROJECT] [--dry-run]
Copy REMOTE (a file or folder, recursively) from worker 0 into LOCAL (default: .), e.g.
  $PROG twindiff europe-west4-a dreambooth-dog ./runs/
REMOTE       relative to ~/twindiff on the worker (where tpu/run.sh runs commands), so the
             --output_dir of the run; an absolute path or one starting with ~ is taken as it is
--worker     the worker to copy from (default 0: process 0 writes a run's outputs)
--project    the Google Cloud project (default: gcloud's configured one)
--dry-run    print the gcloud command, run nothing"
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positional=() worker=0
while (($#)); do
  if common_option "$@"; then
    shift "$SHIFT" && continue
  fi
  case $1 in
    --worker | --worker=*) take_value worker "$@" && shift "$SHIFT" ;;
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") && shift ;;
  esac
done
((${#positional[@]} <= 4)) || usage_error "too many arguments: ${positional[4]}"
check_positional NAME "${positional[0]:-}"
check_positional ZONE "${positional[1]:-}"
[[ -n ${positional[2]:-} ]] || usage_error "missing REMOTE (the folder to copy, e.g. the --output_dir)"
name=${positional[0]} zone=${positional[1]} remote=${positional[2]} local=${positional[3]:-.}
[[ $worker =~ ^[0-9]+$ ]] || usage_error "bad --worker '$worker': one worker number, e.g. 0"
[[ $remote != gs://* ]] || usage_error "$remote is in Cloud Storage: gcloud storage cp -r $remote $local"
case $remote in
  /* | \~ | \~/*) ;;
  *) remote="$REMOTE_REPO/$remote" ;; # scp reads a relative remote path from the home folder
esac

gcloud_tpu scp --recurse --worker="$worker" "$name:$remote" "$local" --zone="$zone"
