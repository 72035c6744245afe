#!/usr/bin/env bash
# tpu_vm.sh: create, set up, run on, copy from and delete a Cloud TPU VM for landmark-tf.
#
# Usage: launch/tpu_vm.sh [OPTIONS] COMMAND [ARGS...]
#
# Commands:
#   create                     create the TPU VM (a Spot VM with --spot)
#   setup [PACKAGE]            install landmark-tf[tpu] (BACKEND=jax: [cpu,jax-tpu]) on every
#                              worker. PACKAGE: empty = pack
#                              this checkout (git-tracked and untracked, not ignored, files);
#                              a local or gs:// wheel; or a pip requirement
#   train FLAGFILE [-- FLAG...]
#                              run landmark-train with FLAGFILE; FLAGs after `--` override it
#                              (absl: the last value wins)
#   stage PROGRAM FLAGFILE [-- FLAG...]
#                              the same for any landmark-* program (landmark-export, ...)
#   run [--] COMMAND...        run a shell command on the workers (--worker, default all)
#   logs NAME                  follow the log of a `--detach`ed run (NAME = flagfile stem)
#   copy REMOTE LOCAL          scp REMOTE (a path on worker 0) to LOCAL. Outputs normally go to
#                              gs:// directly; this is for local-disk leftovers
#   status                     describe the TPU VM (state, type, runtime)
#   delete                     delete the TPU VM
#   all FLAGFILE [-- FLAG...]  create, setup, train, delete; deletes on failure too unless --keep
#
# Options:
#   --dry_run                  print each gcloud command (shell-quoted, one a line) instead of
#                              running it; nothing is created, copied or deleted
#   --spot                     create a Spot VM (cheap, preemptible; see "Preemption" below)
#   --keep                     `all`: keep the VM after the run (for inspection)
#   --retries N                `all`: after a preemption, recreate the VM and resume, N times
#                              (waiting RETRY_DELAY seconds, default 60, in between)
#   --detach                   train/stage: run under nohup on the VM and return at once
#   --worker W                 worker index or `all`; default all for run and 0 for the rest
#   --config FILE              source FILE (shell VAR=value lines) before applying defaults
#   --project P --zone Z --accelerator_type T --runtime_version V --name N --bucket B
#   --backend B
#                              the same as the variables below, for one call
#   -h, --help                 this text
#
# Configuration, in one place (environment variables, or a --config file; options win):
#   PROJECT           Google Cloud project; empty = gcloud's configured project
#   ZONE              default europe-west4-a (has v3-8; v4 lives in us-central2-b)
#   ACCELERATOR_TYPE  default v3-8; e.g. v4-8, v4-32 (suffix > 8 = multi-host slice)
#   BACKEND           tensorflow (default: tensorflow-tpu, one client drives the slice) or jax
#                     (Keras 3 on JAX: v5e and v6e, whose TF runtimes are gone, or by choice;
#                     every worker runs the same landmark-train, joined by
#                     --coordinator_address=auto on a multi-host slice)
#   TF_VERSION        default 2.20.0 (the tensorflow-tpu pinned by the [tpu] extra)
#   RUNTIME_VERSION   default tpu-vm-tf-$TF_VERSION-pjrt, or tpu-vm-tf-$TF_VERSION-pod-pjrt
#                     for multi-host slices; BACKEND=jax: v2-alpha-tpuv5-lite (v5e),
#                     v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4, v5p), as Cloud TPU's JAX
#                     guides say; list them: gcloud compute tpus tpu-vm versions list
#   TPU_NAME          default landmark-tf
#   BUCKET            gs://NAME or NAME. Replaces gs://YOUR_BUCKET in flagfiles; keep it in
#                     the TPU's region. The VM's service account needs read/write on it
#   SERVICE_ACCOUNT   optional service account for the VM
#   PACKAGE           default for `setup`
#   MULTI_HOST        0/1 to override the guess from ACCELERATOR_TYPE
#
# Preemption: a Spot VM can be taken back at any time. landmark-train writes step-exact
# checkpoints to its --workdir on gs:// and resumes from the latest one, so rerun the same
# command (`all` does it by itself with --retries N). Nothing on the VM's disk is needed.
#
# Workers: TensorFlow drives a whole slice from one client, so train/stage run on worker 0;
# on a multi-host slice with --tpu=$TPU_NAME (and TPU_LOAD_LIBRARY=0, as Cloud TPU's TF Pod
# guides do), on a single host with --tpu=local. JAX runs one process per host: on a
# multi-host slice landmark-train runs on every worker with --backend=jax
# --coordinator_address=auto (each reads its own shards; worker 0 writes logs and
# checkpoints), on a single host on worker 0. setup installs on every worker.
#
# Examples:
#   export PROJECT=my-project BUCKET=gs://my-landmarks
#   launch/tpu_vm.sh --dry_run all launch/glr2020/b5_stage1_clean512.flags
#   launch/tpu_vm.sh --spot --retries 5 all launch/glr2020/b7_stage1_clean512.flags
#   launch/tpu_vm.sh train launch/glr2020/b7_stage2_full512.flags -- --train_steps=2000
set -euo pipefail

readonly SCRIPT_NAME="tpu_vm.sh"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly REPO_ROOT
readonly PLACEHOLDER_BUCKET="gs://YOUR_BUCKET"
# Literal on purpose: these expand on the TPU VM, not here.
# shellcheck disable=SC2016
readonly REMOTE_PATH='export PATH="$HOME/.local/bin:$PATH"'
# shellcheck disable=SC2016
readonly REMOTE_SRC='$HOME/landmark-tf'
# shellcheck disable=SC2016
readonly REMOTE_LOGS='$HOME/landmark-logs'

DRY_RUN=0
KEEP=0
DETACH=0
RETRIES=0
WORKER=""

usage() {
  sed -n '2,/^set -euo pipefail$/p' "${BASH_SOURCE[0]}" | sed '$d' | sed -E 's/^# ?//'
}

die() {
  echo "${SCRIPT_NAME}: error: $*" >&2
  exit 2
}

note() {
  echo "${SCRIPT_NAME}: $*" >&2
}

# Quotes one word for a POSIX shell (and for Python's shlex): bare when safe, else '...'.
quote() {
  local s="$1"
  if [[ -n "$s" && "$s" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry_run prints it as one shell-quoted line on stdout.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

# --- configuration -------------------------------------------------------------------------

load_config() {
  local config="${CONFIG_FILE:-${LANDMARK_TPU_CONFIG:-}}"
  if [[ -n "$config" ]]; then
    [[ -f "$config" ]] || die "--config: no such file: $config"
    # shellcheck source=/dev/null
    source "$config"
  fi
  PROJECT="${OPT_PROJECT:-${PROJECT:-}}"
  ZONE="${OPT_ZONE:-${ZONE:-europe-west4-a}}"
  ACCELERATOR_TYPE="${OPT_ACCELERATOR_TYPE:-${ACCELERATOR_TYPE:-v3-8}}"
  TF_VERSION="${TF_VERSION:-2.20.0}"
  BACKEND="${OPT_BACKEND:-${BACKEND:-tensorflow}}"
  [[ "$BACKEND" == tensorflow || "$BACKEND" == jax ]] \
    || die "BACKEND must be tensorflow or jax, got '$BACKEND'"
  TPU_NAME="${OPT_NAME:-${TPU_NAME:-landmark-tf}}"
  BUCKET="${OPT_BUCKET:-${BUCKET:-}}"
  SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"
  PACKAGE="${PACKAGE:-}"
  SPOT="${OPT_SPOT:-${SPOT:-0}}"
  [[ "$ACCELERATOR_TYPE" =~ ^[a-z0-9]+-([0-9]+)$ ]] \
    || die "ACCELERATOR_TYPE must look like v3-8 or v4-32, got '$ACCELERATOR_TYPE'"
  # Slices whose size suffix exceeds 8 span several hosts, for every TPU generation.
  if [[ -z "${MULTI_HOST:-}" ]]; then
    MULTI_HOST=$((BASH_REMATCH[1] > 8 ? 1 : 0))
  fi
  [[ "$MULTI_HOST" == 0 || "$MULTI_HOST" == 1 ]] || die "MULTI_HOST must be 0 or 1"
  local default_runtime="tpu-vm-tf-${TF_VERSION}-pjrt"
  ((MULTI_HOST)) && default_runtime="tpu-vm-tf-${TF_VERSION}-pod-pjrt"
  EXTRA="[tpu]"
  if [[ "$BACKEND" == jax ]]; then
    EXTRA="[cpu,jax-tpu]"
    case "$ACCELERATOR_TYPE" in
      v5litepod-* | v5e-*) default_runtime="v2-alpha-tpuv5-lite" ;;
      v6e-*) default_runtime="v2-alpha-tpuv6e" ;;
      *) default_runtime="tpu-ubuntu2204-base" ;;
    esac
  fi
  RUNTIME_VERSION="${OPT_RUNTIME_VERSION:-${RUNTIME_VERSION:-$default_runtime}}"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU_NAME must be lower-case letters, digits and dashes, got '$TPU_NAME'"
}

# gs://NAME for the BUCKET setting, which may be given with or without the scheme.
bucket_url() {
  local name="${BUCKET#gs://}"
  name="${name%/}"
  [[ -n "$name" ]] \
    || die "BUCKET is not set; flagfiles name gs://YOUR_BUCKET (export BUCKET=gs://my-bucket)"
  [[ "$name" =~ ^[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9]$ ]] \
    || die "BUCKET: not a bucket name: '$BUCKET'"
  printf 'gs://%s' "$name"
}

tpu_flags() {
  TPU_FLAGS=(--zone="$ZONE")
  [[ -n "$PROJECT" ]] && TPU_FLAGS+=(--project="$PROJECT")
  return 0
}

# --- gcloud wrappers ------------------------------------------------------------------------

ssh_workers() {  # ssh_workers WORKER REMOTE_COMMAND
  tpu_flags
  # Keepalives: a training stage holds this connection open for hours.
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${TPU_FLAGS[@]}" --worker="$1" \
    --ssh-flag=-oServerAliveInterval=60 --command="$2"
}

cmd_create() {
  tpu_flags
  local args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${TPU_FLAGS[@]}"
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
    --scopes=https://www.googleapis.com/auth/cloud-platform)
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  [[ -n "$SERVICE_ACCOUNT" ]] && args+=(--service-account="$SERVICE_ACCOUNT")
  run "${args[@]}"
}

cmd_delete() {
  tpu_flags
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${TPU_FLAGS[@]}" --quiet
}

cmd_status() {
  tpu_flags
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${TPU_FLAGS[@]}" \
    --format="value(state,acceleratorType,runtimeVersion)"
}

# Writes this checkout (tracked files plus untracked ones git does not ignore) as a tarball.
pack_checkout() {
  local tarball="$1" list
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 \
    || die "setup: $REPO_ROOT is not a git checkout; give a wheel: setup PATH_OR_GS_URL.whl"
  list="$(mktemp)"
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' path; do
      # Deleted but still tracked files stay out (tar would fail on them).
      if [[ -e "$REPO_ROOT/$path" ]]; then printf '%s\0' "$path"; fi
    done >"$list"
  tar -C "$REPO_ROOT" --null -T "$list" -czf "$tarball"
  rm -f "$list"
}

cmd_setup() {
  local package="${1:-$PACKAGE}" remote_pkg
  local pip='python3 -m pip install --user --quiet'
  if [[ -z "$package" ]]; then
    local tarball="${TMPDIR:-/tmp}/landmark-tf-src-$$.tar.gz"
    if ((DRY_RUN)); then
      note "would pack $REPO_ROOT into $tarball"
    else
      pack_checkout "$tarball"
    fi
    tpu_flags
    run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:landmark-tf-src.tar.gz" \
      "${TPU_FLAGS[@]}" --worker=all
    ((DRY_RUN)) || rm -f "$tarball"
    ssh_workers all "set -e; rm -rf ${REMOTE_SRC}; mkdir -p ${REMOTE_SRC}; \
tar -xzf \$HOME/landmark-tf-src.tar.gz -C ${REMOTE_SRC}; \
${pip} --upgrade pip; ${pip} \"${REMOTE_SRC}${EXTRA}\""
  else
    if [[ "$package" == gs://* ]]; then
      remote_pkg="/tmp/$(basename "$package")"
      ssh_workers all "set -e; gcloud storage cp $(quote "$package") $(quote "$remote_pkg")"
      package="${remote_pkg}${EXTRA}"
    elif [[ -f "$package" ]]; then
      remote_pkg="/tmp/$(basename "$package")"
      tpu_flags
      run gcloud compute tpus tpu-vm scp "$package" "$TPU_NAME:$remote_pkg" "${TPU_FLAGS[@]}" \
        --worker=all
      package="${remote_pkg}${EXTRA}"
    fi
    ssh_workers all "set -e; ${pip} --upgrade pip; ${pip} $(quote "$package")"
  fi
  # A cheap end-to-end check that the console script and the backend import on every worker.
  local probe="import tensorflow as tf; print(\"tensorflow\", tf.__version__)"
  [[ "$BACKEND" == jax ]] && probe="import jax; print(\"jax\", jax.__version__)"
  ssh_workers all "${REMOTE_PATH}; landmark-train --only_check_flags && python3 -c '${probe}'"
}

# Reads an absl flagfile into FLAGS_READ: one flag a line, comments and blank lines dropped.
read_flagfile() {
  local file="$1" line
  [[ -f "$file" ]] || die "no such flagfile: $file"
  FLAGS_READ=()
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line%"${line##*[![:space:]]}"}"
    [[ -z "$line" || "$line" == \#* || "$line" == //* ]] && continue
    [[ "$line" == --* ]] || die "$file: not a flag line: $line"
    FLAGS_READ+=("$line")
  done <"$file"
  ((${#FLAGS_READ[@]})) || die "$file: no flags in it"
}

# Replaces gs://YOUR_BUCKET with $BUCKET in the global array WORDS (bash 3.2 has no namerefs).
substitute_bucket() {
  local i url
  [[ "${WORDS[*]}" == *"$PLACEHOLDER_BUCKET"* ]] || return 0
  url="$(bucket_url)"
  for i in "${!WORDS[@]}"; do
    WORDS[i]="${WORDS[$i]//"$PLACEHOLDER_BUCKET"/$url}"
  done
}

# stage PROGRAM FLAGFILE [-- FLAG...]: the program, flags inlined, on the right worker(s).
cmd_stage() {
  local program="$1" flagfile="$2"
  shift 2
  [[ "$program" =~ ^landmark-[a-z]+$ ]] || die "stage: PROGRAM must be a landmark-* command"
  if (($#)); then
    [[ "$1" == "--" ]] || die "stage: extra flags go after '--', got '$1'"
    shift
  fi
  read_flagfile "$flagfile"
  WORDS=("${FLAGS_READ[@]}" "$@")
  local env_prefix="${REMOTE_PATH}; " worker="${WORKER:-0}"
  if [[ "$program" == landmark-train && "$BACKEND" == jax ]]; then
    WORDS+=(--backend=jax)
    if ((MULTI_HOST)); then
      WORDS+=(--coordinator_address=auto)
      worker="${WORKER:-all}"
    fi
  elif [[ "$program" == landmark-train ]]; then
    if ((MULTI_HOST)); then
      env_prefix+="export TPU_NAME=$(quote "$TPU_NAME") TPU_LOAD_LIBRARY=0; "
      WORDS+=(--tpu="$TPU_NAME")
    else
      WORDS+=(--tpu=local)
    fi
  fi
  substitute_bucket
  local remote
  remote="${env_prefix}$(quote_all "$program" "${WORDS[@]}")"
  if ((DETACH)); then
    local name log
    name="$(basename "$flagfile")"
    log="${REMOTE_LOGS}/$(quote "${name%.*}").log"
    remote="mkdir -p ${REMOTE_LOGS}; nohup bash -c $(quote "$remote") >${log} 2>&1 </dev/null & \
echo \"started; log: ${log}\""
  fi
  ssh_workers "$worker" "$remote"
}

cmd_logs() {
  (($# == 1)) || die "logs NAME (the flagfile stem of a --detach run)"
  ssh_workers "${WORKER:-0}" "tail -n 100 -F ${REMOTE_LOGS}/$(quote "$1").log"
}

cmd_run() {
  [[ "${1:-}" == "--" ]] && shift
  (($#)) || die "run: give a command to run on the workers"
  local remote
  if (($# == 1)); then
    remote="$1"  # one word: taken as a shell command line, e.g. 'ls ~ && df -h'
  else
    remote="$(quote_all "$@")"
  fi
  ssh_workers "${WORKER:-all}" "${REMOTE_PATH}; ${remote}"
}

cmd_copy() {
  (($# == 2)) || die "copy REMOTE LOCAL"
  tpu_flags
  run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$1" "$2" "${TPU_FLAGS[@]}" \
    --worker="${WORKER:-0}"
}

was_preempted() {
  ((DRY_RUN)) && return 1
  tpu_flags
  local state
  state="$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${TPU_FLAGS[@]}" \
    --format='value(state)' 2>/dev/null || echo GONE)"
  note "TPU state: ${state:-unknown}"
  [[ "$state" == PREEMPTED || "$state" == TERMINATED || "$state" == GONE ]]
}

all_cleanup() {
  local status=$?
  trap - EXIT
  if ((KEEP)); then
    note "--keep: leaving $TPU_NAME running; delete it with: $0 delete"
  elif ! cmd_delete; then
    note "could not delete $TPU_NAME; delete it by hand: $0 delete"
  fi
  ((status == 0)) || note "failed (exit $status); checkpoints stay in the workdir: rerun to resume"
  exit "$status"
}

cmd_all() {
  (($# >= 1)) || die "all FLAGFILE [-- FLAG...]"
  # Fail on bad arguments, a bad flagfile or a missing BUCKET before anything is created.
  (($# == 1)) || [[ "$2" == "--" ]] || die "all: extra flags go after '--', got '$2'"
  read_flagfile "$1"
  WORDS=("${FLAGS_READ[@]}" "${@:2}")
  substitute_bucket
  local attempt=0 status
  trap all_cleanup EXIT
  while :; do
    set +e
    (
      set -e
      cmd_create
      cmd_setup
      cmd_stage landmark-train "$@"
    )
    status=$?
    set -e
    ((status == 0)) && return 0
    if ((attempt >= RETRIES)) || ! was_preempted; then
      exit "$status"
    fi
    attempt=$((attempt + 1))
    note "preempted; recreating $TPU_NAME (retry $attempt of $RETRIES), training resumes"
    cmd_delete || true
    sleep "${RETRY_DELAY:-60}"
  done
}

# --- command line -----------------------------------------------------------------------------

main() {
  local command=""
  CONFIG_FILE=""
  while (($#)); do
    case "$1" in
      -h | --help) usage; exit 0 ;;
      --dry_run | --dry-run) DRY_RUN=1 ;;
      --spot) OPT_SPOT=1 ;;
      --keep) KEEP=1 ;;
      --detach) DETACH=1 ;;
      --retries=* | --worker=* | --config=* | --project=* | --zone=* | --name=* | --bucket=* | \
        --accelerator_type=* | --runtime_version=* | --backend=*)
        set -- "${1%%=*}" "${1#*=}" "${@:2}"
        continue
        ;;
      --retries | --worker | --config | --project | --zone | --name | --bucket | \
        --accelerator_type | --runtime_version | --backend)
        (($# >= 2)) || die "$1 needs a value"
        case "$1" in
          --retries) RETRIES="$2" ;;
          --worker) WORKER="$2" ;;
          --config) CONFIG_FILE="$2" ;;
          --project) OPT_PROJECT="$2" ;;
          --zone) OPT_ZONE="$2" ;;
          --name) OPT_NAME="$2" ;;
          --bucket) OPT_BUCKET="$2" ;;
          --accelerator_type) OPT_ACCELERATOR_TYPE="$2" ;;
          --runtime_version) OPT_RUNTIME_VERSION="$2" ;;
          --backend) OPT_BACKEND="$2" ;;
        esac
        shift
        ;;
      -*) die "unknown option: $1 (see --help)" ;;
      *) command="$1"; shift; break ;;
    esac
    shift
  done
  [[ -n "$command" ]] || { usage >&2; exit 2; }
  [[ "$RETRIES" =~ ^[0-9]+$ ]] || die "--retries must be a whole number"
  [[ -z "$WORKER" || "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "--worker: all or N"
  load_config
  case "$command" in
    create) (($# == 0)) || die "create takes no arguments"; cmd_create ;;
    setup) (($# <= 1)) || die "setup [PACKAGE]"; cmd_setup "$@" ;;
    train) (($# >= 1)) || die "train FLAGFILE [-- FLAG...]"; cmd_stage landmark-train "$@" ;;
    stage) (($# >= 2)) || die "stage PROGRAM FLAGFILE [-- FLAG...]"; cmd_stage "$@" ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs "$@" ;;
    copy) cmd_copy "$@" ;;
    status) cmd_status ;;
    delete) cmd_delete ;;
    all) cmd_all "$@" ;;
    *) die "unknown command: $command (see --help)" ;;
  esac
}

main "$@"
