#!/usr/bin/env bash
# Show the end of the training log of one worker (default 0), or follow it with --follow.
#   tpu_scripts/logs.sh --name dpoq-tpu --zone us-central2-b [--worker 0] [--lines 100] [--follow] [--dry-run]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,3p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"

WORKER=0
LINES=100
TAIL="tail -n"
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --worker) WORKER="${2:?--worker needs a value}"; shift 2 ;;
    --lines) LINES="${2:?--lines needs a value}"; shift 2 ;;
    --follow) TAIL="tail -f -n"; shift ;;
    *) die "unknown option $1" ;;
  esac
done
gcloud_flags

run gcloud compute tpus tpu-vm ssh "${NAME}" --worker="${WORKER}" "${GCLOUD_FLAGS[@]}" \
  --command="${TAIL} ${LINES} ~/dpoq_train.log"
