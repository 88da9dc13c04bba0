"""dpoq_jax.train"""
