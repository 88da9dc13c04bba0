"""Config files shipped with the package: the tiny CPU configs of the synthetic tasks.

`<task>_sft.py` and `<task>_dpo.py` (task: error_injection, dense_reward) are what `dpoq demo` and the
experiments train with by default (`dpoq_jax.experiments.runs.default_config`); their values come from
`dpoq_jax.train.config.synthetic_config`. experiments/configs/ in the repository re-exports them, so
`dpoq train --config experiments/configs/error_injection_sft.py` runs the same config from a clone.
From an installed package, their folder is printed by
`python -c "import dpoq_jax.configs as c; print(c.__path__[0])"`.
"""
