"""SFT of Pythia 2.8B on the chosen TL;DR summaries: the paper's reference model (lr 0.5e-6, batch 128,
one epoch of the 64,832 comparisons' preferred summaries, RMSprop, 150 warm-up steps, clip 10).

    dpoq train --config experiments/configs/tldr_pythia2p8b_sft.py --workdir /ckpt/tldr_sft \
        --config.model.path=/models/pythia-2.8b --config.data.path=/data/tldr_comparisons \
        --config.data.data_dir=/data/tfds

`:1gpu` fits one 80 GB GPU (micro-batches of 8, rematerialised blocks); `:pythia1b` swaps in Pythia 1B
(--config.model.path must then point at it). On a TPU VM use tpu_scripts/launch.sh with the same flags.
"""

import ml_collections as mc

from dpoq_jax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.stage = "sft"
    c.model.init = "hf"
    c.model.path = ""  # a local Hugging Face directory of EleutherAI/pythia-2.8b (--config.model.path)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.source = "tldr"
    c.data.path = ""  # the manual dir with the TL;DR comparison JSON files (--config.data.path)
    c.data.data_dir = ""  # where tfds prepares the dataset (--config.data.data_dir)
    c.data.eval_split = "validation"
    c.data.num_eval = 2048
    c.data.sft_responses = "chosen"
    c.data.layout = "padded"
    c.data.seq_len = 640
    c.data.response_len = 128
    c.data.max_prompt_tokens = 512
    c.data.overflow = "drop"
    c.data.on_error = "skip"
    c.optim.name = "rmsprop"
    c.optim.lr = 5e-7
    c.optim.warmup_steps = 150
    c.optim.clip_norm = 10.0
    c.train.batch_size = 128
    c.train.micro_batches = 4
    c.train.num_steps = 507  # one epoch: 64,832 / 128
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.eval_batches = 16
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.mesh = mc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})  # FSDP over all chips
    if arg in ("1gpu", "pythia1b"):
        c.train.micro_batches = 16
    if arg == "pythia1b":
        c.optim.lr = 1e-6
    elif arg not in (None, "1gpu"):
        raise ValueError(f"tldr_pythia2p8b_sft: unknown variant {arg!r} (known: 1gpu, pythia1b)")
    return c
