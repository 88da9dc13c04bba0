"""Tiny CPU DPO run on the synthetic dense_reward task, starting from (and referencing) the SFT run.

    dpoq train --config experiments/configs/dense_reward_sft.py --workdir /tmp/dpoq/dense_reward_sft
    dpoq train --config experiments/configs/dense_reward_dpo.py --workdir /tmp/dpoq/dense_reward_dpo

The SFT workdir is the default of model.path; `--config.model.path=DIR` points elsewhere.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    del arg
    return synthetic_config("dense_reward", "dpo", sft_workdir="/tmp/dpoq/dense_reward_sft")
