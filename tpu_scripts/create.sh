#!/usr/bin/env bash
# Create a TPU VM (or a queued resource that becomes one).
#   tpu_scripts/create.sh --name dpoq-tpu --zone us-central2-b --type v4-32 [--version V] [--spot] [--queued] [--dry-run]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,3p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"

TYPE="v4-8"
VERSION="tpu-ubuntu2204-base"
SPOT=0
QUEUED=0
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="${2:?--type needs a value}"; shift 2 ;;
    --version) VERSION="${2:?--version needs a value}"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) die "unknown option $1" ;;
  esac
done
gcloud_flags

if [[ "${QUEUED}" -eq 1 ]]; then
  cmd=(gcloud compute tpus queued-resources create "${NAME}" --node-id="${NAME}"
       --accelerator-type="${TYPE}" --runtime-version="${VERSION}" "${GCLOUD_FLAGS[@]}")
else
  cmd=(gcloud compute tpus tpu-vm create "${NAME}" --accelerator-type="${TYPE}" --version="${VERSION}"
       "${GCLOUD_FLAGS[@]}")
fi
if [[ "${SPOT}" -eq 1 ]]; then
  cmd+=(--spot)
fi
run "${cmd[@]}"
