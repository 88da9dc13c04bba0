"""Experiment 2: likelihood search on a DPO policy is reward search, and it over-optimises (paper §5.2).

The experiment is dpoq_jax.experiments.search_overopt; this script holds its scales and writes
experiments/results/search_overopt.md.

    python -m experiments.search_overopt            # full (256 prompts, 3 β)
    python -m experiments.search_overopt --quick    # a smoke run
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.search_overopt import main

SCALES = {
    "full": dict(sft_steps=400, dpo_steps=300, betas=(0.1, 0.3, 1.0), beams=(1, 2, 5, 10, 20), n_prompts=256),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.3,), beams=(1, 2, 5), n_prompts=64),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
