"""Tiny CPU SFT run on the synthetic arithmetic_chain task (random-init Llama-shaped decoder, 2 layers):
the reference of the implicit-process-rewards experiment, trained on solutions with errors at known rates.

    dpoq train --config experiments/configs/arithmetic_chain_sft.py --workdir runs/arithmetic_chain_sft
"""

from dpoq_jax.train.config import synthetic_config


def chain_config(stage: str, sft_workdir: str = ""):
    """synthetic_config with rows long enough for six steps ("1a3=8|" each, prompt 7 tokens)."""
    c = synthetic_config("arithmetic_chain", stage, sft_workdir=sft_workdir)
    c.data.sft_responses = "chosen"
    c.data.max_prompt_tokens = 12  # "<bos>5a3:6=" is 7
    c.data.response_len = 38  # 6 steps × 6 tokens, the last without "|", + EOS = 36, two to spare
    c.data.seq_len = 48
    return c


def get_config(arg=None):
    del arg
    return chain_config("sft")
