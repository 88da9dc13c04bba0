"""Experiment 3: implicit rewards during DPO, with and without an SFT'd reference (paper §5).

The experiment is dpoq_jax.experiments.implicit_rewards; this script holds its scales and writes
experiments/results/implicit_rewards.md (implicit_rewards_dense_reward.md with --task dense_reward).

    python -m experiments.implicit_rewards            # full
    python -m experiments.implicit_rewards --quick    # a smoke run
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.implicit_rewards import main

# Steps, lr and eval cadence equal to experiment 1's, whose SFT and β = 0.1 runs this reuses (error_injection:
# the lr/steps its sweep chose); per_task: dense_reward keeps the config's DPO lr (1e-3) for 200 steps, a
# regime in which DPO improves its gold score over the reference (docs/experiments.md §3).
SCALES = {
    "full": dict(sft_steps=400, dpo_lr=3e-5, dpo_steps=50, beta=0.1, eval_every=25, n_check=256, n_gen=256,
                 per_task={"dense_reward": dict(dpo_lr=None, dpo_steps=200)}),
    "quick": dict(sft_steps=150, dpo_lr=None, dpo_steps=100, beta=0.1, eval_every=25, n_check=64, n_gen=32),
}  # fmt: skip

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
