"""Implicit process rewards from outcome labels only (issue #25): step-error localisation and best-of-N.

The experiment is dpoq_jax.experiments.process_rewards; this script holds its scales and writes
experiments/results/process_rewards.md (tables with bootstrap intervals over seeds and held-out prompts,
paired differences, verdicts). Training runs go to runs/experiments/arithmetic_chain/seed<N>; a rerun
reuses them.

    python -m experiments.process_rewards                    # full, seeds 0-4 (≈ 13 min a seed, 2 CPU cores)
    python -m experiments.process_rewards --sweep --seeds 0  # the lr/steps sweep, one seed, first
    python -m experiments.process_rewards --dpo-lr 3e-4 --dpo-steps 600 --ce-lr 1e-3 --ce-steps 300
    python -m experiments.process_rewards --quick            # a smoke run (2 seeds)
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.process_rewards import main

# sft_steps: the reference; n_train_prompts × n_train_cands: reference samples labelled by their final
# answer (DPO: up to pairs_per_prompt pairs a prompt; CE: every candidate); dpo / ce: lr and steps of the
# two PRMs (the sweep's choice, docs/experiments.md); n_val_*: thresholds (and the sweep); n_test_*:
# held-out prompts × candidates; ns: best-of-N sizes, bon_repeats draws of N per prompt; n_boot: bootstrap.
SCALES = {
    "full": dict(
        sft_steps=6000,
        n_train_prompts=4160,  # the 520 training problems, 8 times each
        n_train_cands=16,
        pairs_per_prompt=4,
        beta=0.1,
        dpo=dict(lr=3e-4, steps=2000),
        ce=dict(lr=3e-4, steps=2000),
        sweep=((1e-4, 2000), (3e-4, 700), (3e-4, 2000), (1e-3, 700), (1e-3, 2000)),
        n_val_prompts=80,  # every validation problem
        n_val_cands=16,
        n_test_prompts=200,  # every test problem
        n_test_cands=64,
        ns=(1, 4, 16, 64),
        bon_repeats=16,
        n_boot=1000,
    ),
    "quick": dict(
        sft_steps=600,
        n_train_prompts=520,
        n_train_cands=8,
        pairs_per_prompt=2,
        beta=0.1,
        dpo=dict(lr=3e-4, steps=200),
        ce=dict(lr=3e-4, steps=200),
        sweep=((3e-4, 100), (1e-3, 200)),
        n_val_prompts=40,
        n_val_cands=8,
        n_test_prompts=64,
        n_test_cands=64,
        ns=(1, 4, 16, 64),
        bon_repeats=4,
        n_boot=300,
    ),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
