r"""The tiny CPU configs of the synthetic tasks, one file: `synthetic.py:TASK:STAGE[:tiny][:SFT_WORKDIR]`.
(The same name as `dpoq_jax/data/synthetic.py` on purpose: that module holds the tasks, this one the run
configs that train on them.)

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

import ml_collections as mc

from dpoq_jax.data.synthetic import DenseRewardTask
from dpoq_jax.train.config import base_config

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


# A tiny Llama-shaped decoder (RMSNorm, SwiGLU, rotary, grouped KV heads) over the synthetic tasks'
# 42-token vocabulary: trains in seconds on a CPU.
TINY_LLAMA = {
    "family": "llama",
    "vocab_size": 42,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "max_position_embeddings": 64,
    "norm": "rmsnorm",
    "norm_eps": 1e-6,
    "activation": "silu",
    "gated_mlp": True,
    "rotary_dim": 16,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def synthetic_config(task: str, stage: str, sft_workdir: str = "", tiny: bool = False) -> mc.ConfigDict:
    """Tiny CPU config for a synthetic task (TASKS), stage "sft" (random init) or "dpo" (from the SFT
    run's workdir `sft_workdir`, its frozen copy as the reference); `tiny`: the tests' size (TINY)."""
    c = base_config()
    c.stage = stage
    c.data.source = "synthetic"
    c.data.task = task
    c.data.num_examples = 8192
    c.data.num_eval = 256
    c.data.seq_len = 32
    c.data.response_len = 12
    c.data.max_prompt_tokens = 16
    c.data.sft_responses = "chosen" if task == "error_injection" else "all"
    # the synthetic experiments were calibrated on fixed padded rows without remat: their numbers stay
    c.data.layout = "padded"
    c.data.bucket_step = 0
    c.model.remat = ""
    if task == "dense_reward":
        c.data.on_error = "skip"  # two reference samples can coincide: such pairs carry no preference
        # responses run to max_len letters + EOS (with one to spare): none is truncated, since the
        # experiments on this task are about response lengths
        c.data.response_len = DenseRewardTask.max_len + 2
        c.data.seq_len = c.data.response_len + 8
    if task == "arithmetic_chain":  # rows long enough for six steps ("1a3=8|" each, prompt 7 tokens)
        c.data.sft_responses = "chosen"
        c.data.max_prompt_tokens = 12  # "<bos>5a3:6=" is 7
        c.data.response_len = 38  # 6 steps × 6 tokens, the last without "|", + EOS = 36, two to spare
        c.data.seq_len = 48
    c.model.config = mc.ConfigDict(TINY_LLAMA)
    c.optim.name = "adamw"
    c.optim.clip_norm = 10.0
    c.train.batch_size = 32
    c.train.log_every = 10
    c.checkpoint.every_steps = 100
    c.mesh = mc.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    if stage == "sft":
        c.model.init = "random"
        c.optim.lr = 3e-3
        c.optim.warmup_steps = 20
        c.optim.schedule = "cosine"
        c.optim.end_factor = 0.1
        c.train.num_steps = 800
        c.train.eval_every = 200
    else:
        c.model.init = "checkpoint"
        c.model.path = sft_workdir
        c.loss.beta = 0.1
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 10
        c.train.num_steps = 200
        c.train.eval_every = 50
    if tiny:
        for key, value in TINY.items():
            group, *path = key.split(".")
            node = c[group]
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
    return c


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
    return synthetic_config(task, stage, sft_workdir=sft, tiny=tiny)
