#!/usr/bin/env bash
# Ahead-of-time TPU compiles of both TL;DR Pythia-2.8B configs on v4-8, v5e-8 and v5p-8 (a CPU host
# with the `tpu` extra is enough), plus the largest per-chip micro-batch that fits, searched by
# `dpoq compile --search-batch`. Writes benchmarks/results/tpu_aot.json.
#   benchmarks/tpu_aot.sh [OUT_JSON] [TOPOLOGIES...]   (defaults: the JSON above; v4-8 v5e-8 v5p-8)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-benchmarks/results/tpu_aot.json}"
shift || true
TOPOS=("$@")
if [[ ${#TOPOS[@]} -eq 0 ]]; then TOPOS=(v4-8 v5e-8 v5p-8); fi
SEARCH="${SEARCH:-v4-8}"  # topologies that also get the batch search (each one a few compiles)
TMP="$(mktemp -d "${OUT}.parts.XXXX")"
trap 'rm -rf "${TMP}"' EXIT
export JAX_PLATFORMS=cpu
MODEL=experiments/configs/pythia-2.8b.json
for stage in sft dpo; do
  for topo in "${TOPOS[@]}"; do
    dpoq compile --config "experiments/configs/tldr_pythia2p8b_${stage}.py" --topology "${topo}" \
      --model-config "${MODEL}" --json "${TMP}/${stage}_${topo}.json" 2>/dev/null
    if [[ " ${SEARCH} " == *" ${topo} "* ]]; then
      dpoq compile --config "experiments/configs/tldr_pythia2p8b_${stage}.py" --topology "${topo}" \
        --model-config "${MODEL}" --search-batch --config.train.micro_batches=1 \
        --json "${TMP}/search_${stage}_${topo}.json" 2>/dev/null
    fi
  done
done
python - "${TMP}" "${OUT}" <<'PY'
import glob, json, os, subprocess, sys
tmp, out = sys.argv[1:]
runs = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{tmp}/*.json"))}
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
json.dump({"command": "benchmarks/tpu_aot.sh", "commit": commit, "runs": runs}, open(out, "w"), indent=1)
print(f"wrote {out}")
PY
