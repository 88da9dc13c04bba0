"""Experiment 1: does DPO's per-token implicit reward point at the injected errors? (paper §5.1)

The experiment is dpoq_jax.experiments.credit_assignment; this script holds its scales and writes
experiments/results/credit_assignment.md (tables, heatmap, β sweep, verdict).

    python -m experiments.credit_assignment            # full (about 10 min on 2 CPU cores)
    python -m experiments.credit_assignment --quick    # a smoke run (about 2 min)
    python -m experiments.credit_assignment --config experiments/configs/tldr_pythia2p8b ...  # at scale
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.credit_assignment import main

# dpo_steps per β; n_eval held-out pairs scored
SCALES = {
    "full": dict(sft_steps=600, dpo_steps=400, betas=(0.03, 0.1, 0.3), n_eval=512, eval_every=20),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.1,), n_eval=64, eval_every=20),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
