#!/usr/bin/env bash
# Install this checkout of dpoq_jax (and jax[tpu]) on every worker of a TPU VM.
#   tpu_scripts/setup.sh --name dpoq-tpu --zone us-central2-b [--dry-run]
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/.." && pwd)"
usage() { sed -n '2,3p' "${BASH_SOURCE[0]}"; }
# shellcheck source=tpu_scripts/common.sh
source "${HERE}/common.sh"
parse_common "$@"
if [[ ${#EXTRA_ARGS[@]} -gt 0 ]]; then
  die "unknown option ${EXTRA_ARGS[0]}"
fi
gcloud_flags

# A fresh private temporary folder for the archive (no fixed path to collide with or leave behind).
STAGE="$(mktemp -d)"
trap 'rm -rf "${STAGE}"' EXIT
TARBALL="${STAGE}/dpoq_jax.tar.gz"
# The committed tree (git archive), so that every worker runs exactly the same code.
run git -C "${REPO}" archive --format=tar.gz --prefix=dpoq_jax/ -o "${TARBALL}" HEAD
run gcloud compute tpus tpu-vm scp "${TARBALL}" "${NAME}:~/dpoq_jax.tar.gz" --worker=all "${GCLOUD_FLAGS[@]}"
run gcloud compute tpus tpu-vm ssh "${NAME}" --worker=all "${GCLOUD_FLAGS[@]}" \
  --command="rm -rf ~/dpoq_jax && tar xzf ~/dpoq_jax.tar.gz -C ~ && pip install -U 'jax[tpu]' && pip install -e ~/dpoq_jax'[gcs]'"
