#!/usr/bin/env bash
# Launch `dpoq train` with a config on all workers (jax.distributed finds its peers on TPU VMs).
#   tpu_scripts/launch.sh --name dpoq-tpu --zone us-central2-b --config FILE[:arg] --workdir DIR [--config.key=value ...] [--dry-run]
# The run goes on in the background on every worker; its output is in ~/dpoq_train.log (see logs.sh).
# The workdir is best a gs://bucket/path (checkpoints, metrics, exports go straight to Cloud Storage; the
# TPU's service account needs write access to the bucket, see docs/tpu.md); a local path must be one
# directory shared by all workers (an NFS or gcsfuse mount at the same path).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,4p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"

CONFIG=""
WORKDIR=""
OVERRIDES=()
set -- "${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a value}"; shift 2 ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift 2 ;;
    --config.*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown option $1" ;;
  esac
done
[[ -n "${CONFIG}" ]] || die "--config is required"
[[ -n "${WORKDIR}" ]] || die "--workdir is required (gs://bucket/path, or a directory shared by all workers)"
if [[ "${WORKDIR}" != gs://* && "${WORKDIR}" != /* ]]; then
  die "--workdir ${WORKDIR}: give gs://bucket/path or an absolute path shared by all workers"
fi
gcloud_flags

train=(dpoq train --config "${CONFIG}" --workdir "${WORKDIR}" "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
remote="cd ~/dpoq_jax && nohup $(printf '%q ' "${train[@]}")> ~/dpoq_train.log 2>&1 &"
run gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${GCLOUD_FLAGS[@]}" --command="${remote}"
