#!/usr/bin/env bash
# Install twindiff with the TPU build of JAX on every worker of a TPU VM or pod slice.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
PROG=tpu/setup.sh
USAGE="usage: $PROG NAME ZONE [--repo URL [--ref REF]] [--python VERSION] [--worker all|N]
                     [--project PROJECT] [--dry-run]
Put twindiff in ~/twindiff on every worker and install it, with jax[tpu], into ~/twindiff-venv:
  pip install -e '.[flax,tpu,data]'. Safe to run again (after a local change, say).
default      pack this checkout (git ls-files: tracked and untracked files that git does not
             ignore, uncommitted changes included) into a tarball and scp it to every worker
--repo URL   git clone URL on every worker instead (a repeat fetches and checks out again)
--ref REF    the branch, tag or commit to check out with --repo (default: the remote's HEAD)
--python     the Python for the venv (default 3.12; the runtimes' Ubuntu 22.04 has only 3.10,
             so uv, installed with pip, fetches a build of it)
--worker     the workers to set up: all (default), or e.g. 3 to redo one
--project    the Google Cloud project (default: gcloud's configured one)
--dry-run    print the commands (the local packing, then gcloud), run nothing"
# shellcheck source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

positional=() repo="" ref="" python=3.12 worker=all
while (($#)); do
  if common_option "$@"; then
    shift "$SHIFT" && continue
  fi
  case $1 in
    --repo | --repo=*) take_value repo "$@" && shift "$SHIFT" ;;
    --ref | --ref=*) take_value ref "$@" && shift "$SHIFT" ;;
    --python | --python=*) take_value python "$@" && shift "$SHIFT" ;;
    --worker | --worker=*) take_value worker "$@" && shift "$SHIFT" ;;
    -*) usage_error "unknown option $1" ;;
    *) positional+=("$1") && shift ;;
  esac
done
((${#positional[@]} <= 2)) || usage_error "too many arguments: ${positional[2]}"
check_positional NAME "${positional[0]:-}"
check_positional ZONE "${positional[1]:-}"
name=${positional[0]} zone=${positional[1]}
[[ -z $ref || -n $repo ]] || usage_error "--ref needs --repo"
[[ $python =~ ^3\.[0-9]+$ ]] || usage_error "bad --python '$python': e.g. 3.12"
check_worker "$worker"

# One remote shell line per step, joined with "; " under `set -e`. `~` stays unquoted so that the
# worker's shell expands it; everything that came from the command line is quoted.
steps=("set -e")
if [[ -n $repo ]]; then
  steps+=(
    "if [ ! -d ~/$REMOTE_REPO/.git ]; then git clone -q $(quote "$repo") ~/$REMOTE_REPO; fi"
    "cd ~/$REMOTE_REPO"
    "git fetch -q origin $(quote "${ref:-HEAD}")"
    "git checkout -q FETCH_HEAD"
  )
else
  tarball="${TMPDIR:-/tmp}/twindiff-$name.tar.gz"
  # Files that git lists but that are gone from the work tree (deleted, not yet committed) are
  # left out: tar would stop on them.
  # shellcheck disable=SC2016  # $0, $1 and $f belong to the inner bash
  pack='cd "$0" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d "" f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done | tar --null -T - -czf "$1"'
  steps+=(
    "mkdir -p ~/$REMOTE_REPO"
    "tar -xzf ~/$REMOTE_REPO.tar.gz -C ~/$REMOTE_REPO"
    "rm -f ~/$REMOTE_REPO.tar.gz"
    "cd ~/$REMOTE_REPO"
  )
fi
check='import jax; print("process", jax.process_index(), "of", jax.process_count(), jax.device_count(), "devices:", jax.devices()[0].device_kind)'
steps+=(
  "python3 -m pip install -q --user uv"
  "if [ ! -x ~/$REMOTE_VENV/bin/python ]; then python3 -m uv venv -q --seed --python $python ~/$REMOTE_VENV; fi"
  ". ~/$REMOTE_VENV/bin/activate"
  "pip install -q -U pip"
  "pip install -q -e $(quote '.[flax,tpu,data]')"
  # All workers at once, as JAX on a pod slice needs: every process sees the global device count.
  "python -c $(quote "$check")"
)
remote=""
for step in "${steps[@]}"; do
  remote+="${remote:+; }$step"
done

if [[ -n $repo ]]; then
  gcloud_tpu ssh "$name" --zone="$zone" --worker="$worker" --command="$remote"
else
  if ! ((DRY_RUN)); then
    git -C "$root" rev-parse --git-dir >/dev/null 2>&1 ||
      usage_error "$root is not a git checkout: pass --repo URL"
    trap 'rm -f "$tarball"' EXIT
  fi
  run bash -c "$pack" "$root" "$tarball"
  gcloud_tpu scp "$tarball" "$name:$REMOTE_REPO.tar.gz" --zone="$zone" --worker="$worker"
  gcloud_tpu ssh "$name" --zone="$zone" --worker="$worker" --command="$remote"
fi
