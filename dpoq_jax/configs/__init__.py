"""Config files shipped with the package: the tiny CPU configs of the synthetic tasks.

`synthetic.py:TASK:STAGE[:tiny][:SFT_WORKDIR]` (TASK: error_injection, dense_reward, arithmetic_chain;
STAGE: sft or dpo) is what `dpoq demo` and the experiments train with by default
(`dpoq_jax.experiments.runs.default_config`), and what the tests train at its `tiny` size. From a clone:
`dpoq train --config dpoq_jax/configs/synthetic.py:error_injection:sft`; from an installed package the
file is printed by `python -c "import dpoq_jax.configs.synthetic as c; print(c.__file__)"`.
"""
