# shellcheck shell=bash disable=SC2034  # its variables are read by the scripts that source it
# Shared by tpu/*.sh (sourced, never run): quoting, --dry-run, usage errors, runtime defaults.
# Each script sets PROG and USAGE before sourcing this file.

# Where twindiff lives on every worker, in the ssh user's home; run.sh --detach's log, in the repo.
REMOTE_REPO=twindiff
REMOTE_VENV=twindiff-venv
REMOTE_LOG=twindiff-run.log

# --dry-run counts wherever it stands, before any other argument is checked (sourced without
# arguments, this file sees the script's own "$@").
DRY_RUN=0
for arg in "$@"; do
  [[ $arg != --dry-run ]] || DRY_RUN=1
done
GCLOUD_GLOBAL=()  # --project=... when given; appended to every gcloud command

usage() {
  printf '%s\n' "$USAGE"
  exit 0
}

# Bad usage: one line on stderr naming the problem, exit status 2.
usage_error() {
  echo "$PROG: $1 (see $PROG -h)" >&2
  exit 2
}

# Quote one word for a POSIX shell, as Python's shlex.quote does: bare when it holds only safe
# characters, else in single quotes with each ' written as '\''. bash's printf %q can produce
# $'...' forms that neither sh nor shlex.split read back, so it is not used.
quote() {
  local word=$1 squote="'" escaped="'\\''"
  # --flag=VALUE: only VALUE needs quoting, which reads better (--command='...').
  if [[ $word =~ ^--[A-Za-z0-9_-]+= ]]; then
    printf '%s' "${word%%=*}="
    word=${word#*=}
  fi
  if [[ -n $word && $word != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$word"
  else
    # Pattern and replacement come from variables so that no bash version strips their quotes.
    printf "'%s'" "${word//$squote/$escaped}"
  fi
}

# All arguments quoted and joined by spaces: one line a shell reads back as the same argv.
quote_all() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote "$word"
    sep=" "
  done
}

# Run a command, or with --dry-run print it (quoted, one line on stdout) and run nothing.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# ${a[@]+"${a[@]}"}: an empty array under `set -u` in the bash 3.2 that macOS ships.
gcloud_tpu() {
  run gcloud compute tpus tpu-vm "$@" ${GCLOUD_GLOBAL[@]+"${GCLOUD_GLOBAL[@]}"}
}

# Read the value of `--opt VALUE` or `--opt=VALUE` (in "$2"...) into the variable named $1, and
# set SHIFT to the number of arguments it took.
take_value() {
  local var=$1 opt=$2 value
  shift 2
  case $opt in
    *=*) value=${opt#*=} opt=${opt%%=*} SHIFT=1 ;;
    *) value=${1:-} SHIFT=2 ;;
  esac
  [[ -n $value && $value != --* ]] || usage_error "$opt needs a value"
  printf -v "$var" '%s' "$value"
}

# The options every script takes: -h, --dry-run, --project. Returns 1 for any other argument;
# else sets SHIFT.
common_option() {
  local project
  case $1 in
    -h | --help) usage ;;
    --dry-run) DRY_RUN=1 SHIFT=1 ;;
    --project | --project=*)
      take_value project "$@"
      GCLOUD_GLOBAL=("--project=$project")
      ;;
    *) return 1 ;;
  esac
}

# Validate a name-like positional argument (TPU name, zone): non-empty, no leading dash.
check_positional() {
  local what=$1 value=$2
  [[ -n $value ]] || usage_error "missing $what"
  [[ $value != -* ]] || usage_error "unknown option $value"
}

check_worker() {
  [[ $1 == all || $1 =~ ^[0-9]+(,[0-9]+)*$ ]] || usage_error "bad --worker '$1': 'all' or 0,1,..."
}

# The Cloud TPU runtime ("software version") for JAX on an accelerator type, as Google's
# "TPU software versions" page recommends for PyTorch and JAX: a plain Ubuntu 22.04 image on which
# twindiff installs jax[tpu] itself (the tpu-vm-tf-* images carry TensorFlow, which flaxdiff
# does not use). Prints nothing for a generation without a known default.
default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
  esac
}

check_accelerator() {
  [[ $1 =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] ||
    usage_error "bad accelerator type '$1': e.g. v3-8, v4-32, v5p-8, v5litepod-8, v6e-8"
}
