r"""DPO of a Hugging Face chat model on its own verifiable-constraint preferences (issue #23).

The experiment's config (python -m dpoq_jax.experiments.constraint_prefs): one file for both stages, the stage
after the colon; the model folder and the data files come as overrides, e.g.

    dpoq train --config experiments/configs/constraint_dpo.py:dpo --workdir runs/cdpo \
        --config.model.path=runs/smollm2 --config.data.path=train.jsonl \
        --config.data.eval_path=validation.jsonl [--config.model.lora.rank=16]

Sizes suit short answers (a ChatML prompt of about 50 tokens, responses cut at 48 tokens) of a 135M model on
CPU; the experiment sets steps, lr and LoRA per run.
"""

from dpoq_jax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.stage = arg or "dpo"
    c.model.init = "hf"
    c.model.path = ""
    c.data.source = "jsonl"
    # one row per pair: the prompt once, then both responses (data/layouts.py); 80 + 2 x 48 tokens.
    # Same losses as the padded layout, a third less compute per step on CPU (docs/experiments.md §6)
    c.data.layout = "prefix_shared"
    c.data.seq_len = 176
    c.data.bucket_step = 0  # fixed rows and no remat, as in the recorded runs (docs/experiments.md §6)
    c.model.remat = ""
    c.data.max_prompt_tokens = 80
    c.data.response_len = 48
    c.data.num_eval = 0  # the whole validation file
    c.data.on_error = "fail"
    c.loss.beta = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 5
    c.train.batch_size = 8
    c.train.num_steps = 100
    c.train.log_every = 10
    c.train.eval_every = 25
    c.checkpoint.every_steps = 1000
    return c
