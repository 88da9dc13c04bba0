"""Re-export of the packaged config dpoq_jax/configs/dense_reward_dpo.py, the one source of its values.

    dpoq train --config experiments/configs/dense_reward_dpo.py ...
"""

from dpoq_jax.configs.dense_reward_dpo import get_config  # noqa: F401
