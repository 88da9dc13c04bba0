r"""Tiny CPU DPO run on the synthetic error_injection task, starting from (and referencing) the SFT run.

    dpoq train --config experiments/configs/error_injection_sft.py --workdir runs/error_injection_sft
    dpoq train --config experiments/configs/error_injection_dpo.py:runs/error_injection_sft \
        --workdir runs/error_injection_dpo

The config argument (after the colon) is the SFT run's workdir and becomes model.path;
`--config.model.path=DIR` works too. Without either, loading stops with one line naming model.path.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    return synthetic_config("error_injection", "dpo", sft_workdir=arg or "")
