"""Experiment 3: implicit rewards during DPO, with and without an SFT'd reference (paper §5.4).

The experiment is dpoq_jax.experiments.implicit_rewards; this script holds its scales and writes
experiments/results/implicit_rewards.md (implicit_rewards_dense_reward.md with --task dense_reward).

    python -m experiments.implicit_rewards            # full
    python -m experiments.implicit_rewards --quick    # a smoke run
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.implicit_rewards import main

SCALES = {
    "full": dict(sft_steps=600, dpo_steps=400, beta=0.1, eval_every=20, n_check=256),
    "quick": dict(sft_steps=150, dpo_steps=100, beta=0.1, eval_every=20, n_check=64),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
