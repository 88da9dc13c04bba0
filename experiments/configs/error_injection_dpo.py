"""Tiny CPU DPO run on the synthetic error_injection task, starting from (and referencing) the SFT run.

    dpoq train --config experiments/configs/error_injection_sft.py --workdir /tmp/dpoq/error_injection_sft
    dpoq train --config experiments/configs/error_injection_dpo.py --workdir /tmp/dpoq/error_injection_dpo

The SFT workdir is the default of model.path; `--config.model.path=DIR` points elsewhere.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    del arg
    return synthetic_config("error_injection", "dpo", sft_workdir="/tmp/dpoq/error_injection_sft")
