"""dpoq_jax: token-level DPO in JAX/Flax ("From r to Q*: Your Language Model is Secretly a Q-Function")."""

__version__ = "0.1.0"
