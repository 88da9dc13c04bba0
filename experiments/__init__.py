"""The paper's experiments on the synthetic tasks: one thin script each (its scales and results
folder), the configs, and the results. The experiments themselves live in dpoq_jax.experiments.

Run `python -m experiments.<name>` from the repository root.
"""
