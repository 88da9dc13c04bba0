#!/usr/bin/env bash
# Keep a run going on spot or queued TPU capacity: dpoq train in the foreground on all workers; exit 75
#   (preempted), 76 (a peer lost) or 134 (jax aborted: process 0 lost): relaunch; VM gone: recreate it
#   (create.sh, setup.sh) and relaunch; 0 (done) or any other exit status on a running VM: stop.
#   tpu_scripts/keep_running.sh --name dpoq-tpu --zone us-central2-b --type v4-32 [--spot|--queued] [--version V] [--max-restarts N] [--wait S] --config FILE[:arg] --workdir gs://bucket/run [--config.key=value ...] [--dry-run]
# The workdir must outlive the VM: a gs:// path (a disk on the VM goes with it). --dry-run prints one
# round: the state query, the commands that recreate the VM, and the training command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,7p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"

EXIT_PREEMPTED=75  # dpoq_jax/train/faults.py
EXIT_PEER_LOST=76
EXIT_ABORTED=134  # SIGABRT: jax's client aborts a process whose coordinator (process 0) died
TYPE="v4-8"
VERSION=""
CAPACITY=()
MAX_RESTARTS=100
WAIT=60
CONFIG=""
WORKDIR=""
OVERRIDES=()
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --spot) CAPACITY+=(--spot); shift ;;
    --queued) CAPACITY+=(--queued); shift ;;
    --max-restarts) MAX_RESTARTS="${2:?--max-restarts needs a value}"; shift 2 ;;
    --wait) WAIT="${2:?--wait needs a value}"; shift 2 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown option $1" ;;
  esac
done
[[ -n "${CONFIG}" ]] || die "--config is required"
[[ "${WORKDIR}" == gs://* ]] || die "--workdir ${WORKDIR:-(none)}: give gs://bucket/path (it must outlive a preempted VM)"
[[ "${MAX_RESTARTS}" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number"
gcloud_flags
COMMON_ARGS=(--name "${NAME}" --zone "${ZONE}")
if [[ -n "${PROJECT}" ]]; then
  COMMON_ARGS+=(--project "${PROJECT}")
fi
CREATE_ARGS=(--type "${TYPE}" "${CAPACITY[@]+"${CAPACITY[@]}"}")
if [[ -n "${VERSION}" ]]; then
  CREATE_ARGS+=(--version "${VERSION}")
fi
DELETE_ARGS=()
if [[ " ${CAPACITY[*]+"${CAPACITY[*]}"} " == *" --queued "* ]]; then
  DELETE_ARGS+=(--queued)
fi
DRY=()
if [[ "${DRY_RUN}" -eq 1 ]]; then
  DRY=(--dry-run)
fi

say() { echo "keep_running: $*" >&2; }

describe=(gcloud compute tpus tpu-vm describe "${NAME}" "${GCLOUD_FLAGS[@]}" --format=value\(state\))
# vm_state: READY, PREEMPTED, CREATING, ... or MISSING when there is no such VM.
vm_state() {
  "${describe[@]}" 2>/dev/null || echo MISSING
}

recreate() {
  bash "${HERE}/delete.sh" "${COMMON_ARGS[@]}" "${DELETE_ARGS[@]+"${DELETE_ARGS[@]}"}" "${DRY[@]+"${DRY[@]}"}" || true
  bash "${HERE}/create.sh" "${COMMON_ARGS[@]}" "${CREATE_ARGS[@]}" "${DRY[@]+"${DRY[@]}"}"
  if [[ "${DRY_RUN}" -eq 0 ]]; then  # a queued resource becomes a VM when capacity is granted
    until [[ "$(vm_state)" == READY ]]; do sleep "${WAIT}"; done
  fi
  bash "${HERE}/setup.sh" "${COMMON_ARGS[@]}" "${DRY[@]+"${DRY[@]}"}"
}

train=(dpoq train --config "${CONFIG}" --workdir "${WORKDIR}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
remote="cd ~/dpoq_jax && $(printf '%q ' "${train[@]}")>> ~/dpoq_train.log 2>&1"
launch=(gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${GCLOUD_FLAGS[@]}" --command="${remote}")

if [[ "${DRY_RUN}" -eq 1 ]]; then
  run "${describe[@]}"
  recreate
  run "${launch[@]}"
  exit 0
fi

restarts=0
while true; do
  state="$(vm_state)"
  if [[ "${state}" != READY ]]; then
    say "VM ${NAME} is ${state}: recreating it"
    recreate
  fi
  rc=0
  run "${launch[@]}" || rc=$?
  if [[ "${rc}" -eq 0 ]]; then
    say "the run is done (${WORKDIR})"
    exit 0
  fi
  if [[ "${rc}" -ne "${EXIT_PREEMPTED}" && "${rc}" -ne "${EXIT_PEER_LOST}" && "${rc}" -ne "${EXIT_ABORTED}" \
        && "$(vm_state)" == READY ]]; then
    say "dpoq train failed with exit status ${rc} on a running VM: not relaunching (see logs.sh)"
    exit "${rc}"
  fi
  restarts=$((restarts + 1))
  if [[ "${restarts}" -gt "${MAX_RESTARTS}" ]]; then
    say "gave up after ${MAX_RESTARTS} restarts"
    exit 1
  fi
  say "exit status ${rc}: relaunch ${restarts} of at most ${MAX_RESTARTS} (resumes from the last checkpoint)"
  sleep "${WAIT}"
done
