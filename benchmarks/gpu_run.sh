#!/usr/bin/env bash
# The DPO-step benchmark on one lent NVIDIA H100/H200, in under 8 minutes (one `run` call):
# Pythia-2.8B (4 pairs/step) then Pythia-1B (8 pairs/step), TL;DR-like lengths, rows of 512,
# the PyTorch/transformers step first for each shape, then dpoq_jax's layouts with a bfloat16
# frozen reference or precomputed reference log-probs (lean log-probs throughout).
#
#   bash benchmarks/gpu_run.sh                 # from the repository root; extra args go to dpo_step
#
# Each case runs in its own process (clean peak memory; JAX and torch never share the GPU); the
# results JSON is rewritten after every case, so a cut-off run keeps what it measured. The run stops
# starting new cases after --time-budget seconds. Results: benchmarks/results/<device>.json and .png,
# copied to $OUT when that is set (the device machine's output folder).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
python3 -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices())"

python3 -m benchmarks.dpo_step \
  --shapes pythia-2.8b,pythia-1b --pairs 4,8 \
  --cases prefix_shared/frozen_bf16/lean,padded/frozen_bf16/lean,prefix_shared/precomputed/lean,packed/precomputed/lean \
  --steps 5 --warmup 2 --time-budget 390 --case-timeout 150 "$@" | tee benchmarks/results/gpu_run.log

if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.json benchmarks/results/*.png benchmarks/results/gpu_run.log "$OUT"/ 2>/dev/null || true
fi
