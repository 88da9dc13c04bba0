"""dpoq_jax.models"""
