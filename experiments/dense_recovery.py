"""Experiment 4 (beyond the paper): does DPO recover a dense per-token reward?

The experiment is dpoq_jax.experiments.dense_recovery; it uses the DPO policies of experiment 2 (same
workdir and scales, trained if missing) and writes experiments/results/dense_recovery.md.

    python -m experiments.dense_recovery [--quick]
"""

import sys
from pathlib import Path

from dpoq_jax.experiments.dense_recovery import main
from experiments.search_overopt import SCALES as SEARCH_SCALES

SCALES = {
    "full": dict(SEARCH_SCALES["full"], n_eval=512),
    "quick": dict(SEARCH_SCALES["quick"], n_eval=64),
}

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], SCALES, Path(__file__).resolve().parent / "results"))
