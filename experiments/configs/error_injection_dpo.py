"""Re-export of the packaged config dpoq_jax/configs/error_injection_dpo.py, the one source of its values.

    dpoq train --config experiments/configs/error_injection_dpo.py ...
"""

from dpoq_jax.configs.error_injection_dpo import get_config  # noqa: F401
