"""Re-export of the packaged config dpoq_jax/configs/error_injection_sft.py, the one source of its values.

    dpoq train --config experiments/configs/error_injection_sft.py ...
"""

from dpoq_jax.configs.error_injection_sft import get_config  # noqa: F401
