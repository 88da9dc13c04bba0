r"""The tiny CPU configs of the synthetic tasks, one file: `synthetic.py:TASK:STAGE[:tiny][:SFT_WORKDIR]`.

    dpoq train --config dpoq_jax/configs/synthetic.py:error_injection:sft --workdir runs/ei_sft
    dpoq train --config dpoq_jax/configs/synthetic.py:error_injection:dpo:runs/ei_sft --workdir runs/ei_dpo
    dpoq train --config dpoq_jax/configs/synthetic.py:error_injection:sft:tiny --workdir runs/t   # seconds

TASK is error_injection, dense_reward or arithmetic_chain; STAGE is sft (random init) or dpo (from the
SFT run's workdir, its frozen copy as the reference: the text after the stage, or
`--config.model.path=DIR`; without either, loading stops with one line naming model.path). `tiny` is the
size the tests and the soak benchmark train: one layer 32 wide, 512 examples, batch 8, a metrics row
every step. These are what `dpoq demo` and the experiments train by default
(`dpoq_jax.experiments.runs.default_config`). From an installed package the file's path is printed by
`python -c "import dpoq_jax.configs.synthetic as c; print(c.__file__)"`.

arithmetic_chain: rows long enough for six steps ("1a3=8|" each, prompt 7 tokens); its dpo stage trains on
the task's own pairs (a correct solution vs one with an injected error); the implicit-PRM experiment
trains that stage on the reference's sampled solutions labelled by their final answer instead.
"""

from dpoq_jax.train.config import synthetic_config

TASKS = ("error_injection", "dense_reward", "arithmetic_chain")
STAGES = ("sft", "dpo")
# the tests' size (and the soak benchmark's): a one-layer model, few examples, a log row every step
TINY = {
    "model.config.hidden_size": 32,
    "model.config.num_layers": 1,
    "model.config.intermediate_size": 64,
    "model.config.head_dim": 8,
    "model.config.rotary_dim": 8,
    "data.num_examples": 512,
    "data.num_eval": 32,
    "train.batch_size": 8,
    "train.progress_bar": False,
    "train.log_every": 1,
}


def parse(arg: str | None) -> tuple[str, str, bool, str]:
    """"TASK:STAGE[:tiny][:SFT_WORKDIR]" -> (task, stage, tiny, sft_workdir); bad: a one-line error."""
    task, _, rest = (arg or "").partition(":")
    stage, _, rest = rest.partition(":")
    tiny = rest == "tiny" or rest.startswith("tiny:")
    sft = rest[len("tiny") :].lstrip(":") if tiny else rest  # the rest may hold a colon (gs://...)
    if task not in TASKS or stage not in STAGES:
        raise ValueError(
            f"synthetic.py:{arg or ''}: want TASK:STAGE[:tiny][:SFT_WORKDIR] with TASK one of "
            f"{', '.join(TASKS)} and STAGE one of {', '.join(STAGES)}"
        )
    if sft and stage == "sft":
        raise ValueError(f"synthetic.py:{arg}: an SFT workdir ({sft!r}) is for the dpo stage only")
    return task, stage, tiny, sft


def get_config(arg=None):
    task, stage, tiny, sft = parse(arg)
    c = synthetic_config(task, stage, sft_workdir=sft)
    if task == "arithmetic_chain":
        c.data.sft_responses = "chosen"
        c.data.max_prompt_tokens = 12  # "<bos>5a3:6=" is 7
        c.data.response_len = 38  # 6 steps × 6 tokens, the last without "|", + EOS = 36, two to spare
        c.data.seq_len = 48
    if tiny:
        for key, value in TINY.items():
            group, *path = key.split(".")
            node = c[group]
            for p in path[:-1]:
                node = node[p]
            node[path[-1]] = value
    return c
