r"""DPO of a Hugging Face chat model on conversational preference data (docs/chat.md).

    dpoq train --config experiments/configs/chat_dpo.py:smollm2/ --workdir runs/chat_dpo \
        --config.data.path=prefs.jsonl [--config.model.lora.rank=16]

The argument after the colon is the model folder (model.path; its tokenizer and chat template are used).
data.path is a JSONL file or, with --config.data.source=datasets, a parquet/arrow file, a save_to_disk
folder or a cached Hub dataset, in TRL's formats (data/chat.py). Sizes suit a short CPU run of a
135M-parameter model; raise data.response_len/max_prompt_tokens for longer conversations. Rows are the
defaults: prefix-shared (the prompt once, both answers after it), as long as the longest pair needs
(data.seq_len 0) and each step's rows cut to its longest pair, rounded up to 64 tokens (data.bucket_step).
"""

from dpoq_jax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.stage = "dpo"
    c.model.init = "hf"
    c.model.path = arg or ""
    c.data.source = "jsonl"
    c.data.max_prompt_tokens = 160
    c.data.response_len = 96
    c.data.on_error = "fail"
    c.loss.beta = 0.1
    c.optim.name = "adamw"
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 10
    c.train.batch_size = 8
    c.train.num_steps = 100
    c.train.log_every = 10
    c.train.eval_every = 50
    c.checkpoint.every_steps = 50
    return c
