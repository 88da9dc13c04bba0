"""Experiment 2: likelihood search on a DPO policy is reward search, and it over-optimises (paper §4).

The experiment is dpoq_jax.experiments.search_overopt; this script holds its scales and writes
experiments/results/search_overopt.md.

    python -m experiments.search_overopt            # full: seeds 0-4, two labellers, β 0.1 and 1.0
    python -m experiments.search_overopt --quick    # a smoke run (2 seeds)
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.search_overopt import main

# Smaller than the single-seed version (400/300 steps, 256 prompts) so five seeds fit on 2 shared cores.
SCALES = {
    "full": dict(
        sft_steps=300, dpo_steps=150, betas=(0.1, 1.0), beams=(1, 2, 5, 10, 20), n_prompts=64, eval_every=25
    ),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.3,), beams=(1, 2, 5), n_prompts=64, eval_every=25),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
