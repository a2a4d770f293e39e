#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice. Every worker (host) of the slice runs the same
#   python -m pretrain_jax train --multi_host ...
# and jax.distributed.initialize() finds the other workers from the TPU VM metadata: there is
# no process manager here, only `gcloud compute tpus tpu-vm ssh --worker=all` to start the
# processes (under nohup, so a dropped ssh session does not kill them) and jax to join them.
#
#   scripts/tpu_pod.sh create                 # the slice: ACCELERATOR (v4-128 = 16 workers)
#   scripts/tpu_pod.sh install                # the repo + .venv with '.[tpu]' on every worker
#   scripts/tpu_pod.sh check                  # every worker: jax.distributed + device counts
#   scripts/tpu_pod.sh run --gin_file=experiments/bert_base_paper.gin \
#       --gin_file=meshes/data_parallel.gin --model_dir=/mnt/shared/runs/bert_base
#   scripts/tpu_pod.sh logs                   # fetch every worker's log to LOCAL_LOG_DIR
#   scripts/tpu_pod.sh stop                   # SIGTERM: finish the step, checkpoint, exit 0
#   scripts/tpu_pod.sh run ...same args...    # resumes from the model_dir's last checkpoint
#   scripts/tpu_pod.sh ssh 'nvidia-smi || ls /dev/accel*'   # any command on every worker
#   scripts/tpu_pod.sh delete
#
# DRY_RUN=1 prints the gcloud commands instead of running them.
#
# --model_dir must be a directory that every worker sees at the same path: orbax writes each
# checkpoint collectively (every host writes its own shards) and process 0 writes
# metrics.jsonl and config.gin there. A Filestore NFS share or a gcsfuse mount of a bucket
# (mounted on every worker, e.g. with `scripts/tpu_pod.sh ssh 'gcsfuse --implicit-dirs
# BUCKET /mnt/shared'`) will do. A gs:// URL does not (yet): the trainer writes config.gin and
# metrics.jsonl with Python's open(); `run` refuses one unless ALLOW_REMOTE_MODEL_DIR=1.
# Data: each host reads its own shard of the task's source (gin host_batches.sharding).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/tpu_pod.sh COMMAND [ARGS...]

commands:
  create            gcloud compute tpus tpu-vm create (TPU_NAME, ZONE, ACCELERATOR, RUNTIME_VERSION)
  install           put the repo on every worker (REPO_URL: git clone; else a tarball of this
                    checkout's HEAD, or TARBALL, pushed with scp) and pip install -e '.[tpu]'
                    into REMOTE_DIR/.venv
  check             on every worker: jax.distributed.initialize(), then process and device counts
  run TRAIN_ARGS    on every worker, in the background under nohup:
                      python -m pretrain_jax train --multi_host --no_progress TRAIN_ARGS
                    (TRAIN_ARGS must include --model_dir=DIR, a path all workers share);
                    each worker logs to ~/LOG_DIR/RUN_NAME.log (appended: a resume adds to it)
  logs              copy every worker's log to LOCAL_LOG_DIR/worker-N.log, print their tails
  stop              SIGTERM the run on every worker (it finishes the step, saves a checkpoint
                    and exits 0), then wait up to STOP_TIMEOUT seconds for it to exit
  ssh COMMAND       run a shell command on every worker
  delete            delete the slice

environment (defaults in brackets):
  TPU_NAME [pretrain-jax]   ZONE [us-central2-b]   PROJECT [gcloud's default]
  ACCELERATOR [v4-128]      e.g. v4-128, v5p-128, v3-128, v5litepod-64, v6e-64
  RUNTIME_VERSION           [tpu-ubuntu2204-base for v2-v4, v2-alpha-tpuv5 for v5p,
                             v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv6e for v6e]
  SPOT [0]                  1: create a Spot slice (preemptible; run again to resume)
  REPO_URL, REPO_REF        git URL (and branch/tag/commit) for install; unset: push a tarball
  TARBALL                   a .tar.gz of the repo to push instead of this checkout's HEAD
  REMOTE_DIR [pretrain_jax] the repo on each worker, relative to the home directory
  PYTHON [python3.11]       the interpreter for the venv (apt-installed if missing)
  LOG_DIR [pretrain_jax_logs]  RUN_NAME [train]   per-worker log ~/LOG_DIR/RUN_NAME.log
  LOCAL_LOG_DIR [tpu_logs/TPU_NAME]              where `logs` puts the copies
  RUN_ENV                   NAME=VALUE words put in the run's environment (e.g. XLA_FLAGS=...)
  SSH_FLAGS                 extra words for gcloud ssh/scp (e.g. --internal-ip, --tunnel-through-iap)
  NUM_WORKERS               hosts in the slice, for `logs` [asked of gcloud; from ACCELERATOR
                            in a dry run]
  STOP_TIMEOUT [900]        seconds `stop` waits for the checkpoint and exit
  DRY_RUN [0]               1: print the gcloud commands instead of running them
EOF
}

TPU_NAME=${TPU_NAME:-pretrain-jax}
ZONE=${ZONE:-us-central2-b}
PROJECT=${PROJECT:-}
ACCELERATOR=${ACCELERATOR:-v4-128}
SPOT=${SPOT:-0}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-}
TARBALL=${TARBALL:-}
REMOTE_DIR=${REMOTE_DIR:-pretrain_jax}
PYTHON=${PYTHON:-python3.11}
LOG_DIR=${LOG_DIR:-pretrain_jax_logs}
RUN_NAME=${RUN_NAME:-train}
LOCAL_LOG_DIR=${LOCAL_LOG_DIR:-tpu_logs/$TPU_NAME}
RUN_ENV=${RUN_ENV:-}
SSH_FLAGS=${SSH_FLAGS:-}
NUM_WORKERS=${NUM_WORKERS:-}
STOP_TIMEOUT=${STOP_TIMEOUT:-900}
DRY_RUN=${DRY_RUN:-0}
ALLOW_REMOTE_MODEL_DIR=${ALLOW_REMOTE_MODEL_DIR:-0}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

default_runtime() {
  case $ACCELERATOR in
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "no default RUNTIME_VERSION for ACCELERATOR=$ACCELERATOR; set RUNTIME_VERSION" ;;
  esac
}

# Hosts in a slice, from its name: v2/v3 name TensorCores (8 a host), v4/v5p TensorCores
# (2 a chip, 4 chips a host), v5e/v6e chips (4 a host in multi-host slices, 8 in a -8).
workers_from_accelerator() {
  local family=${ACCELERATOR%-*} size=${ACCELERATOR##*-}
  [[ $size =~ ^[0-9]+$ ]] || die "cannot read a size from ACCELERATOR=$ACCELERATOR"
  case $family in
    v2|v3|v4|v5p) echo $(( size > 8 ? size / 8 : 1 )) ;;
    v5litepod|v5e|v6e) echo $(( size > 8 ? size / 4 : 1 )) ;;
    *) die "cannot tell the workers of ACCELERATOR=$ACCELERATOR; set NUM_WORKERS" ;;
  esac
}

# A word as the shell would need it quoted (for printing commands that can be pasted).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

show() {
  local line="+" word
  for word in "$@"; do line+=" $(quote "$word")"; done
  echo "$line"
}

# Runs a command, or prints it under DRY_RUN=1.
act() {
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    "$@"
  fi
}

ssh_flags=()
if [[ -n $SSH_FLAGS ]]; then read -r -a ssh_flags <<<"$SSH_FLAGS"; fi
where=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then where+=(--project="$PROJECT"); fi

tpu() { act gcloud compute tpus tpu-vm "$@"; }

# One shell command on every worker at once (gcloud runs the ssh sessions in parallel).
on_all_workers() {
  tpu ssh "$TPU_NAME" "${where[@]}" --worker=all ${ssh_flags[@]+"${ssh_flags[@]}"} \
    --command="$1"
}

num_workers() {
  if [[ -n $NUM_WORKERS ]]; then
    echo "$NUM_WORKERS"
  elif [[ $DRY_RUN == 1 ]]; then
    workers_from_accelerator
  else
    local ips
    ips=$(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" \
          --format='value(networkEndpoints[].ipAddress)')
    local -a workers
    read -r -a workers <<<"${ips//[;,]/ }"  # one address per worker
    (( ${#workers[@]} > 0 )) || die "gcloud describe $TPU_NAME lists no workers; set NUM_WORKERS"
    echo "${#workers[@]}"
  fi
}

log_file="$LOG_DIR/$RUN_NAME.log"  # relative to each worker's home directory
pid_file="$LOG_DIR/$RUN_NAME.pid"
# Shell snippets run on the workers (from the home directory, by gcloud's ssh).
pid_alive="[ -f ~/$pid_file ] && kill -0 \"\$(cat ~/$pid_file)\" 2>/dev/null"

cmd_create() {
  local runtime=${RUNTIME_VERSION:-$(default_runtime)}
  local flags=("${where[@]}" --accelerator-type="$ACCELERATOR" --version="$runtime")
  if [[ $SPOT == 1 ]]; then flags+=(--spot); fi
  tpu create "$TPU_NAME" "${flags[@]}"
}

cmd_install() {
  local setup
  # Ubuntu 22.04 (the TPU VM images) ships Python 3.10; pretrain_jax needs 3.11 or newer.
  setup="cd ~/$REMOTE_DIR"
  setup+=" && { command -v $PYTHON >/dev/null || { sudo apt-get update -q"
  setup+=" && sudo apt-get install -y -q $PYTHON $PYTHON-venv; }; }"
  setup+=" && { [ -x .venv/bin/python ] || $PYTHON -m venv .venv; }"
  setup+=" && .venv/bin/pip install -q --upgrade pip"
  setup+=" && .venv/bin/pip install -q -e '.[tpu]'"
  setup+=" && echo \"\$(hostname): installed in ~/$REMOTE_DIR/.venv\""
  if [[ -n $REPO_URL ]]; then
    local fetch
    fetch="{ [ -d ~/$REMOTE_DIR/.git ] || git clone -q $(quote "$REPO_URL") ~/$REMOTE_DIR; }"
    if [[ -n $REPO_REF ]]; then
      # a branch, tag or commit, as the remote has it now
      fetch+=" && git -C ~/$REMOTE_DIR fetch -q origin $(quote "$REPO_REF")"
      fetch+=" && git -C ~/$REMOTE_DIR checkout -q --detach FETCH_HEAD"
    else
      fetch+=" && git -C ~/$REMOTE_DIR pull -q --ff-only"
    fi
    on_all_workers "set -e; $fetch && $setup"
  else
    local tarball=$TARBALL
    if [[ -z $tarball ]]; then
      local repo
      repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
      tarball=${TMPDIR:-/tmp}/pretrain_jax-$TPU_NAME.tar.gz
      # HEAD as committed: uncommitted edits do not travel (commit them, or pass TARBALL).
      act git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
    fi
    [[ $DRY_RUN == 1 || -f $tarball ]] || die "TARBALL=$tarball does not exist"
    tpu scp "$tarball" "$TPU_NAME":pretrain_jax.tar.gz "${where[@]}" --worker=all \
      ${ssh_flags[@]+"${ssh_flags[@]}"}
    # The tarball replaces the code; the .venv (an editable install) is kept.
    on_all_workers "set -e; mkdir -p ~/$REMOTE_DIR && tar -xzf ~/pretrain_jax.tar.gz -C ~/$REMOTE_DIR && $setup"
  fi
}

cmd_check() {
  on_all_workers "cd ~/$REMOTE_DIR && .venv/bin/python -c 'import jax; jax.distributed.initialize(); print(\"process\", jax.process_index(), \"of\", jax.process_count(), \"-\", jax.local_device_count(), \"local devices,\", jax.device_count(), \"in all:\", jax.devices()[0].device_kind)'"
}

cmd_run() {
  (( $# > 0 )) || die "run needs the train arguments (--gin_file=... --model_dir=DIR); see --help"
  local arg model_dir="" multi=--multi_host progress=--no_progress
  for arg in "$@"; do
    case $arg in
      --model_dir=*) model_dir=${arg#--model_dir=} ;;
      --model_dir) die "give --model_dir=DIR as one word" ;;
      --multi_host) multi="" ;;
      --no_progress) progress="" ;;
    esac
  done
  [[ -n $model_dir ]] || die "run needs --model_dir=DIR (a directory every worker sees)"
  if [[ $model_dir == *://* && $ALLOW_REMOTE_MODEL_DIR != 1 ]]; then
    die "--model_dir=$model_dir: the trainer writes config.gin and metrics.jsonl with" \
        "Python's open(), which cannot write $model_dir; mount it on every worker (gcsfuse," \
        "NFS) and give the mount's path (ALLOW_REMOTE_MODEL_DIR=1 tries anyway)"
  fi
  if [[ $model_dir != /* && $ALLOW_REMOTE_MODEL_DIR != 1 && $model_dir != *://* ]]; then
    echo "tpu_pod.sh: note: --model_dir=$model_dir is relative to ~/$REMOTE_DIR on each" \
         "worker, i.e. on its local disk; a multi-host checkpoint needs a shared one" >&2
  fi
  local env_words=() train
  if [[ -n $RUN_ENV ]]; then read -r -a env_words <<<"$RUN_ENV"; fi
  train="env PYTHONUNBUFFERED=1"  # the log file gets each line as it is printed
  for arg in ${env_words[@]+"${env_words[@]}"}; do train+=" $(printf '%q' "$arg")"; done
  train+=" .venv/bin/python -m pretrain_jax train $multi $progress"
  for arg in "$@"; do train+=" $(printf '%q' "$arg")"; done
  # The process is nohup'd, its input and output detached from ssh, so ssh returns at once
  # and a dropped connection leaves it running; its pid goes to a file for `stop`.
  on_all_workers "set -e; mkdir -p ~/$LOG_DIR; cd ~/$REMOTE_DIR;
if $pid_alive; then echo \"\$(hostname): already running (pid \$(cat ~/$pid_file)); stop it first\" >&2; exit 1; fi;
echo \"=== \$(date -u +%FT%TZ) \$(hostname): $train\" >> ~/$log_file;
nohup $train >> ~/$log_file 2>&1 < /dev/null &
echo \$! > ~/$pid_file; echo \"\$(hostname): started pid \$!, log ~/$log_file\""
}

cmd_logs() {
  local n w
  n=$(num_workers)
  act mkdir -p "$LOCAL_LOG_DIR"
  for (( w = 0; w < n; w++ )); do
    tpu scp "$TPU_NAME:$log_file" "$LOCAL_LOG_DIR/worker-$w.log" "${where[@]}" --worker="$w" \
      ${ssh_flags[@]+"${ssh_flags[@]}"}
  done
  if [[ $DRY_RUN != 1 ]]; then
    for (( w = 0; w < n; w++ )); do
      echo "== $LOCAL_LOG_DIR/worker-$w.log"
      tail -n 3 "$LOCAL_LOG_DIR/worker-$w.log"
    done
  fi
}

cmd_stop() {
  on_all_workers "if $pid_alive; then pid=\$(cat ~/$pid_file); kill -TERM \$pid;
echo \"\$(hostname): sent SIGTERM to \$pid; waiting for its checkpoint\";
for i in \$(seq $STOP_TIMEOUT); do kill -0 \$pid 2>/dev/null || break; sleep 1; done;
if kill -0 \$pid 2>/dev/null; then echo \"\$(hostname): \$pid still running after ${STOP_TIMEOUT}s\" >&2; exit 1; fi;
echo \"\$(hostname): stopped: \$(tail -n 1 ~/$log_file)\"; rm -f ~/$pid_file;
else echo \"\$(hostname): not running\"; fi"
}

cmd_ssh() {
  (( $# > 0 )) || die "ssh needs a command"
  on_all_workers "$*"
}

cmd_delete() {
  tpu delete "$TPU_NAME" "${where[@]}" --quiet
}

command=${1:-}
case $command in
  create|install|check|run|logs|stop|ssh|delete) shift; "cmd_$command" "$@" ;;
  -h|--help|help) usage ;;
  "") usage >&2; exit 2 ;;
  *) echo "tpu_pod.sh: unknown command '$command'" >&2; usage >&2; exit 2 ;;
esac
