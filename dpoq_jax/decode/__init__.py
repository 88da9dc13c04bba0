"""dpoq_jax.decode"""
