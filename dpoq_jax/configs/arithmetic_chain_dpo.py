r"""Tiny CPU DPO run on the synthetic arithmetic_chain task, from (and referencing) the SFT run.

    dpoq train --config experiments/configs/arithmetic_chain_dpo.py:runs/arithmetic_chain_sft \
        --workdir runs/arithmetic_chain_dpo

On the task's own pairs (a correct solution vs one with an injected error: step labels). The
implicit-PRM experiment (`python -m dpoq_jax.experiments.process_rewards`) trains this stage instead on the
reference's own sampled solutions labelled by their final answer (data.source=jsonl).
"""

from dpoq_jax.configs.arithmetic_chain_sft import chain_config


def get_config(arg=None):
    return chain_config("dpo", sft_workdir=arg or "")
