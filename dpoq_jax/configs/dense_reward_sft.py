"""Tiny CPU SFT run on the synthetic dense_reward task (random-init Llama-shaped decoder, 2 layers).

    dpoq train --config experiments/configs/dense_reward_sft.py --workdir runs/dense_reward_sft

Then DPO from it with experiments/configs/dense_reward_dpo.py.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    del arg
    return synthetic_config("dense_reward", "sft")
