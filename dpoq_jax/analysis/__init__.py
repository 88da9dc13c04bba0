"""dpoq_jax.analysis"""
