r"""Tiny CPU DPO run on the synthetic dense_reward task, starting from (and referencing) the SFT run.

    dpoq train --config experiments/configs/dense_reward_sft.py --workdir runs/dense_reward_sft
    dpoq train --config experiments/configs/dense_reward_dpo.py:runs/dense_reward_sft \
        --workdir runs/dense_reward_dpo

The config argument (after the colon) is the SFT run's workdir and becomes model.path;
`--config.model.path=DIR` works too. Without either, loading stops with one line naming model.path.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    return synthetic_config("dense_reward", "dpo", sft_workdir=arg or "")
