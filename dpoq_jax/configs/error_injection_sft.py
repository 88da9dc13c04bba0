"""Tiny CPU SFT run on the synthetic error_injection task (random-init Llama-shaped decoder, 2 layers).

    dpoq train --config experiments/configs/error_injection_sft.py --workdir runs/error_injection_sft

Then DPO from it with experiments/configs/error_injection_dpo.py.
"""

from dpoq_jax.train.config import synthetic_config


def get_config(arg=None):
    del arg
    return synthetic_config("error_injection", "sft")
