"""Experiment 1: does DPO's per-token implicit reward point at the injected errors? (paper §3)

The experiment is dpoq_jax.experiments.credit_assignment; this script holds its scales and writes
experiments/results/credit_assignment.md (tables with 95% intervals over seeds, heatmap, β sweep,
verdicts). Training runs go to runs/experiments/error_injection/seed<N>; a rerun reuses them.

    python -m experiments.credit_assignment                  # full, seeds 0-4 (see the results' Run table)
    python -m experiments.credit_assignment --seeds 0-9      # more seeds
    python -m experiments.credit_assignment --quick          # a smoke run (2 seeds)
    python -m experiments.credit_assignment --config experiments/configs/tldr_pythia2p8b ...  # at scale
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.credit_assignment import main

# dpo_steps per β; settings: β values per setting (fluent errors: the sweep; surprising errors: the
# β = 0.1 run that experiment 3 shares); n_eval held-out pairs scored; n_gen prompts generated.
# Smaller than the single-seed version (600/400 steps) so five seeds fit on 2 shared CPU cores.
SCALES = {
    "full": dict(
        sft_steps=400,
        dpo_steps=200,
        settings={"fluent": (0.03, 0.1, 0.3), "surprising": (0.1,)},
        n_eval=512,
        n_gen=256,
        eval_every=25,
    ),
    "quick": dict(
        sft_steps=150,
        dpo_steps=100,
        settings={"fluent": (0.1,), "surprising": (0.1,)},
        n_eval=64,
        n_gen=32,
        eval_every=25,
    ),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
