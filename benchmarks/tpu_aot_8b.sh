#!/usr/bin/env bash
# "Past one host, on paper": the Llama-3-8B-shaped DPO step (benchmarks/llama3-8b.json, the TL;DR DPO
# config: prefix_shared rows of 768, bf16 compute, remat full, frozen bf16 reference), full and LoRA
# r16, fsdp over every chip, compiled ahead of time for multi-host TPU topologies with `dpoq compile`
# (needs libtpu: the `test`/`tpu` extra). Each compile takes 5-10 min on 2 loaded CPU cores.
#   bash benchmarks/tpu_aot_8b.sh        # writes benchmarks/results/tpu_aot_8b.json
# RUNS lines: NAME TOPOLOGY [--config.k=v ...]; batch sizes are chips x micro_batches(2) x per-chip.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP="$(mktemp -d)"
trap 'rm -rf "${TMP}"' EXIT
RUNS="${RUNS:-v5p32_full v5p:2x2x4 --config.train.batch_size=32
v5p32_full_b128 v5p:2x2x4 --config.train.batch_size=128
v5p32_lora v5p:2x2x4 --config.train.batch_size=32 --config.model.lora.rank=16
v5e64_full v5e:8x8 --config.train.batch_size=128
v5e64_full_b512 v5e:8x8 --config.train.batch_size=512
v5e64_lora v5e:8x8 --config.train.batch_size=128 --config.model.lora.rank=16
v4_64_full v4:2x4x4 --config.train.batch_size=64
v4_64_lora v4:2x4x4 --config.train.batch_size=64 --config.model.lora.rank=16}"
while read -r name topo extra; do
  [ -z "${name}" ] && continue
  # shellcheck disable=SC2086
  python3 -m dpoq_jax.cli compile --config experiments/configs/tldr_pythia2p8b_dpo.py --topology "${topo}" \
    --model-config benchmarks/llama3-8b.json --json "${TMP}/${name}.json" ${extra} 2>/dev/null \
    || echo "${name}: compile failed" >&2
done <<< "${RUNS}"
python3 -m benchmarks.tpu_aot_8b "${TMP}" benchmarks/results/tpu_aot_8b.json
