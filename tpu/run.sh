#!/usr/bin/env bash
# Run one command on all workers of a TPU VM or pod slice at once, from ~/twindiff, in its venv.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
PROG=tpu/run.sh
USAGE="usage: $PROG NAME ZONE [--env KEY=VALUE]... [--detach] [--worker all|N]
                   [--project PROJECT] [--dry-run] -- COMMAND [ARG]...
Run COMMAND on every worker (gcloud ssh --worker=all), in ~/twindiff with ~/twindiff-venv
active. On a pod slice every worker must start the same program: JAX connects them. E.g.
  $PROG twindiff europe-west4-a -- python -m flaxdiff.dreambooth --config tasks/dreambooth.yaml
Options go before --; everything after it is COMMAND, passed on word for word, except
--dry-run, which is this script's wherever it stands (twindiff has no flag of that name).
--env        set KEY=VALUE in COMMAND's environment (repeatable; shown by --dry-run and in the
             echoed command, so pass no secrets this way)
--detach     start COMMAND under nohup and return: it survives a dropped connection; its output
             is appended to ~/twindiff/twindiff-run.log on each worker
--worker     all (default), or e.g. 0 for the first worker only
--project    the Google Cloud project (default: gcloud's configured one)
--dry-run    print the gcloud command, run nothing"
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

positional=() env_vars=() assignment="" detach=0 worker=all
while (($#)); do
  if common_option "$@"; then
    shift "$SHIFT" && continue
  fi
  case $1 in
    --) shift && break ;;
    --env | --env=*)
      take_value assignment "$@" && shift "$SHIFT"
      [[ $assignment =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
        usage_error "bad --env '$assignment': KEY=VALUE"
      env_vars+=("$assignment")
      ;;
    --detach) detach=1 && shift ;;
    --worker | --worker=*) take_value worker "$@" && shift "$SHIFT" ;;
    -*) usage_error "unknown option $1 (options go before --, the command after it)" ;;
    *)
      positional+=("$1") && shift
      # Without --, the first word after NAME and ZONE starts the command.
      ((${#positional[@]} < 3)) || break
      ;;
  esac
done
check_positional NAME "${positional[0]:-}"
check_positional ZONE "${positional[1]:-}"
name=${positional[0]} zone=${positional[1]}
if ((${#positional[@]} == 3)); then
  set -- "${positional[2]}" "$@"
fi
# A --dry-run typed at the end of COMMAND must not start the run it was meant to preview.
words=()
for word in "$@"; do
  [[ $word == --dry-run ]] || words+=("$word")
done
set -- ${words[@]+"${words[@]}"}
(($# > 0)) || usage_error "missing COMMAND after --"
check_worker "$worker"

command=$(quote_all "$@")
if ((${#env_vars[@]})); then
  command="env $(quote_all "${env_vars[@]}") $command"
fi
if ((detach)); then
  # Only the background command's own fds are redirected, so ssh does not wait for it.
  command="{ nohup $command >> $REMOTE_LOG 2>&1 < /dev/null & }"
fi
remote="cd ~/$REMOTE_REPO && . ~/$REMOTE_VENV/bin/activate && $command"
gcloud_tpu ssh "$name" --zone="$zone" --worker="$worker" --command="$remote"
