#!/usr/bin/env bash
# shellcheck disable=SC2034  # NAME etc. are read by the scripts that source this file
# Shared option parsing and the dry-run runner for the TPU scripts (sourced, not executed).
# Every script accepts: --name NAME --zone ZONE [--project PROJECT] [--dry-run] [--help].
# Defaults come from the environment: TPU_NAME, TPU_ZONE, TPU_PROJECT.

NAME="${TPU_NAME:-dpoq-tpu}"
ZONE="${TPU_ZONE:-us-central2-b}"
PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
EXTRA_ARGS=()

# run CMD...: print the command (shell-quoted, one line), then run it unless --dry-run.
run() {
  printf '%q ' "$@" | sed 's/ $//'
  echo
  if [[ "${DRY_RUN}" -eq 0 ]]; then
    "$@"
  fi
}

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# parse_common "$@": consumes the shared options; anything else lands in EXTRA_ARGS for the script.
parse_common() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) NAME="${2:?--name needs a value}"; shift 2 ;;
      --zone) ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --project) PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --dry-run) DRY_RUN=1; shift ;;
      --help|-h) usage; exit 0 ;;
      *) EXTRA_ARGS+=("$1"); shift ;;
    esac
  done
}

# gcloud_flags: the --zone/--project flags every gcloud call takes.
gcloud_flags() {
  GCLOUD_FLAGS=(--zone="${ZONE}")
  if [[ -n "${PROJECT}" ]]; then
    GCLOUD_FLAGS+=(--project="${PROJECT}")
  fi
}
