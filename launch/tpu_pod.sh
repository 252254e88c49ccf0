#!/usr/bin/env bash
# Runs rlj on every worker of a Cloud TPU VM slice (JAX multi-controller: each worker runs the same program).
#
# Run from the repository root on your workstation (gcloud installed and authenticated). See README "TPU pods".
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh COMMAND [ARGS...]

Environment:
  TPU          TPU VM name (required)
  ZONE         zone, e.g. us-east5-a (required)
  PROJECT      project (default: gcloud's configured project)
  ACCELERATOR  accelerator type for `create`, e.g. v5p-32
  RUNTIME      TPU VM software version for `create` (default: v2-alpha-tpuv5)
  SPOT=1       `create` asks for spot capacity
  REPO_URL     git URL that `setup` clones on every worker (default: copy this checkout's tracked files)
  REMOTE_DIR   repository folder on the workers, under the home folder (default: rlj)
  VENV         virtual environment on the workers, under the home folder (default: rlj-venv)

Commands:
  create                 queue a slice (gcloud compute tpus queued-resources create ... --node-id $TPU)
  status                 state of the queued resource and of the TPU VM
  setup                  copy (or clone) the repository to every worker, make the venv, install
                         requirements.txt and jax[tpu]
  run MODULE [ARGS...]   run `python -m MODULE ARGS` on every worker in the background (RLJ_DISTRIBUTED=1,
                         so launch.train joins the slice's jax.distributed job); log in ~/rlj-run.log
  attach MODULE [ARGS]   the same in the foreground, every worker's output streamed here
  logs [WORKER|all]      follow the run log of one worker (default 0)
  stop                   SIGTERM to the run started by `run` on every worker (it checkpoints, then exits)
  copy-ckpt SRC DEST     copy a run's checkpoints: gs:// SRC with gsutil, else from worker 0's disk
  ssh [WORKER|all] CMD   run a shell command on workers (default all)
  delete                 delete the TPU VM and its queued resource

Example:
  TPU=rlj-v5p ZONE=us-east5-a ACCELERATOR=v5p-32 launch/tpu_pod.sh create
  TPU=rlj-v5p ZONE=us-east5-a launch/tpu_pod.sh setup
  TPU=rlj-v5p ZONE=us-east5-a launch/tpu_pod.sh run launch.train --config configs/grpo_tpu.py \
      --config.init.path=gs://BUCKET/gemma-2b --workdir gs://BUCKET/runs/grpo-gemma2b
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 1
}

REMOTE_DIR="${REMOTE_DIR:-rlj}"
VENV="${VENV:-rlj-venv}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5}"
LOG="rlj-run.log"
PIDFILE="rlj-run.pid"

gcloud_tpu() {
  local project=()
  if [[ -n "${PROJECT:-}" ]]; then
    project=(--project "${PROJECT}")
  fi
  gcloud compute tpus "$@" --zone "${ZONE}" "${project[@]}"
}

# on_workers WORKER COMMAND: runs a shell command on one worker or on all of them, in parallel.
on_workers() {
  local worker="$1" command="$2"
  gcloud_tpu tpu-vm ssh "${TPU}" --worker="${worker}" --command "${command}"
}

# quote ARGS...: one string that a remote shell splits back into ARGS.
quote() {
  local out="" arg
  for arg in "$@"; do
    out+=" $(printf '%q' "${arg}")"
  done
  printf '%s' "${out# }"
}

need_slice() {
  [[ -n "${TPU:-}" ]] || die "set TPU (the TPU VM name)"
  [[ -n "${ZONE:-}" ]] || die "set ZONE"
}

cmd_create() {
  [[ -n "${ACCELERATOR:-}" ]] || die "set ACCELERATOR, e.g. v5p-32"
  local extra=()
  if [[ "${SPOT:-0}" == "1" ]]; then
    extra+=(--spot)
  fi
  gcloud_tpu queued-resources create "${TPU}-qr" --node-id "${TPU}" --accelerator-type "${ACCELERATOR}" \
    --runtime-version "${RUNTIME}" "${extra[@]}"
  echo "queued ${TPU}-qr; \`launch/tpu_pod.sh status\` shows when it is ACTIVE"
}

cmd_status() {
  gcloud_tpu queued-resources describe "${TPU}-qr" --format "value(state.state)" || true
  gcloud_tpu tpu-vm describe "${TPU}" --format "value(state,acceleratorType)" || true
}

cmd_setup() {
  if [[ -n "${REPO_URL:-}" ]]; then
    on_workers all "cd ~ && rm -rf ${REMOTE_DIR} && git clone -q $(quote "${REPO_URL}") ${REMOTE_DIR}"
  else
    [[ -d .git ]] || die "run from the repository root (or set REPO_URL)"
    local archive
    archive="$(mktemp -d)/rlj.tar.gz"
    git ls-files -z | tar -czf "${archive}" --null -T -
    gcloud_tpu tpu-vm scp "${archive}" "${TPU}:rlj.tar.gz" --worker=all
    on_workers all "cd ~ && rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf rlj.tar.gz -C ${REMOTE_DIR} \
&& rm rlj.tar.gz"
  fi
  on_workers all "cd ~ && python3 -m venv ${VENV} && ${VENV}/bin/pip install -q --upgrade pip && \
${VENV}/bin/pip install -q -r ${REMOTE_DIR}/requirements.txt 'jax[tpu]'"
  on_workers all "cd ~ && ${VENV}/bin/python -c 'import jax; print(jax.device_count(), \"devices,\", \
jax.local_device_count(), \"on this worker\")'"
}

# The remote command that runs `python -m MODULE ARGS` in the repository with the job's environment.
job_command() {
  printf 'cd ~/%s && export RLJ_DISTRIBUTED=1 PYTHONUNBUFFERED=1 && exec ~/%s/bin/python -m %s' \
    "${REMOTE_DIR}" "${VENV}" "$(quote "$@")"
}

cmd_run() {
  [[ $# -ge 1 ]] || die "run needs a module, e.g. launch.train --config configs/grpo_tpu.py"
  local job
  # setsid: the job leads its own process group (its id goes to the pid file), which `stop` signals whole.
  job="echo \$\$ > ~/${PIDFILE} && $(job_command "$@")"
  on_workers all "cd ~ && rm -f ${PIDFILE} && (setsid nohup bash -c $(quote "${job}") > ${LOG} 2>&1 < /dev/null &) \
&& sleep 2 && echo \"\$(hostname): started process group \$(cat ${PIDFILE})\""
  echo "follow with: launch/tpu_pod.sh logs 0"
}

cmd_attach() {
  [[ $# -ge 1 ]] || die "attach needs a module"
  on_workers all "$(job_command "$@")"
}

cmd_logs() {
  on_workers "${1:-0}" "tail -n 200 -F ~/${LOG}"
}

# SIGTERM: launch.train saves a checkpoint at the next step boundary and exits; relaunching resumes.
cmd_stop() {
  on_workers all "if [ -f ~/${PIDFILE} ]; then kill -TERM -- -\$(cat ~/${PIDFILE}) && rm ~/${PIDFILE}; fi"
}

cmd_copy_ckpt() {
  [[ $# -eq 2 ]] || die "copy-ckpt needs SRC (a run's workdir or its checkpoints folder) and DEST"
  local src="$1" dest="$2"
  if [[ "${src}" == gs://* ]]; then
    mkdir -p "${dest}"
    gsutil -m cp -r "${src}" "${dest}"
  else
    gcloud_tpu tpu-vm scp --recurse --worker=0 "${TPU}:${src}" "${dest}"
  fi
}

cmd_ssh() {
  local worker=all
  if [[ $# -ge 2 ]]; then
    worker="$1"
    shift
  fi
  [[ $# -eq 1 ]] || die "ssh needs a command"
  on_workers "${worker}" "$1"
}

cmd_delete() {
  gcloud_tpu queued-resources delete "${TPU}-qr" --force --quiet
}

main() {
  if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" || "$1" == "help" ]]; then
    usage
    exit 0
  fi
  local command="$1"
  shift
  need_slice
  case "${command}" in
    create) cmd_create "$@" ;;
    status) cmd_status "$@" ;;
    setup) cmd_setup "$@" ;;
    run) cmd_run "$@" ;;
    attach) cmd_attach "$@" ;;
    logs) cmd_logs "$@" ;;
    stop) cmd_stop "$@" ;;
    copy-ckpt) cmd_copy_ckpt "$@" ;;
    ssh) cmd_ssh "$@" ;;
    delete) cmd_delete "$@" ;;
    *)
      usage >&2
      die "unknown command ${command}"
      ;;
  esac
}

main "$@"
