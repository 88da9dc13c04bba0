"""Re-export of the packaged config dpoq_jax/configs/arithmetic_chain_sft.py, the one source of its values.

    dpoq train --config experiments/configs/arithmetic_chain_sft.py ...
"""

from dpoq_jax.configs.arithmetic_chain_sft import get_config  # noqa: F401
