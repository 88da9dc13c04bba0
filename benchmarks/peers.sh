#!/usr/bin/env bash
# dpoq vs TRL 1.16 DPOTrainer vs Tunix 0.1.7 DPOTrainer: one run, same model and batch (benchmarks/peers.py).
#   bash benchmarks/peers.sh                  # CPU: float32, small random Llama, 4 TL;DR-like pairs (~15 min on 2 cores)
#   bash benchmarks/peers.sh --dtype bfloat16 # GPU (benchmarks/gpu_run.sh calls it so): not measured yet
# Extra arguments go to benchmarks/peers.py (e.g. --model smollm2 --model-dir DIR).
# The peers' virtualenvs are created once under ${DPOQ_PEERS_VENVS:-runs/peers_venvs} (needs PyPI).
# Results: benchmarks/results/peers_{cpu,gpu}.json and .png, copied to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m benchmarks.peers "$@" 2>&1 | tee benchmarks/results/peers_run.log
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/peers_*.json benchmarks/results/peers_*.png benchmarks/results/peers_run.log "$OUT"/ 2>/dev/null || true
fi
