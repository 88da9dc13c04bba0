"""dpoq_jax.data"""
