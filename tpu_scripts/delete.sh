#!/usr/bin/env bash
# Delete the TPU VM (or, with --queued, its queued resource).
#   tpu_scripts/delete.sh --name dpoq-tpu --zone us-central2-b [--queued] [--dry-run]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,3p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"

QUEUED=0
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done
gcloud_flags

if [[ "${QUEUED}" -eq 1 ]]; then
  run gcloud compute tpus queued-resources delete "${NAME}" "${GCLOUD_FLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "${NAME}" "${GCLOUD_FLAGS[@]}" --quiet
fi
