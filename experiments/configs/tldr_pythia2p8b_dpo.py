"""DPO of the SFT Pythia 2.8B on TL;DR comparisons with the paper's setting: β = 0.1, lr 0.5e-6,
150 warm-up steps, batch 32, gradient-norm clip 10, RMSprop (as the original DPO code), one epoch.

    dpoq train --config experiments/configs/tldr_pythia2p8b_dpo.py --workdir /ckpt/tldr_dpo \
        --config.model.path=/ckpt/tldr_sft --config.data.path=/data/tldr_comparisons \
        --config.data.data_dir=/data/tfds

model.path is the SFT run's workdir (its latest checkpoint; a Hugging Face directory works with
--config.model.init=hf). The reference is a frozen bfloat16 copy of it; to skip its forward pass,
run `dpoq precompute-ref` with the same flags and add --config.reference.mode=precomputed
--config.reference.logps_path=WORKDIR/ref_logps.jsonl. `:1gpu` fits one 80 GB GPU; `:pythia1b` is
the same recipe for Pythia 1B.
"""

import ml_collections as mc

from dpoq_jax.train.config import base_config


def get_config(arg=None):
    c = base_config()
    c.stage = "dpo"
    c.model.init = "checkpoint"
    c.model.path = ""  # the SFT workdir (--config.model.path)
    c.model.param_dtype = "float32"
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.reference.mode = "frozen"
    c.reference.dtype = "bfloat16"
    c.data.source = "tldr"
    c.data.path = ""  # TL;DR comparisons manual dir (--config.data.path)
    c.data.data_dir = ""  # tfds data dir (--config.data.data_dir)
    c.data.eval_split = "validation"
    c.data.num_eval = 2048
    c.data.layout = "prefix_shared"  # the prompt once per pair: same loss as padded, less compute
    c.data.seq_len = 768
    c.data.response_len = 128
    c.data.max_prompt_tokens = 512
    c.data.overflow = "drop"
    c.data.on_error = "skip"
    c.loss.beta = 0.1
    c.loss.loss_type = "sigmoid"
    c.optim.name = "rmsprop"
    c.optim.lr = 5e-7
    c.optim.warmup_steps = 150
    c.optim.clip_norm = 10.0
    c.train.batch_size = 32
    c.train.micro_batches = 2
    c.train.num_steps = 2026  # one epoch: 64,832 / 32
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 64
    c.checkpoint.every_steps = 250
    c.checkpoint.keep = 2
    c.mesh = mc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    if arg in ("1gpu", "pythia1b"):
        c.train.micro_batches = 8
    if arg == "pythia1b":
        c.optim.lr = 1e-6
    elif arg not in (None, "1gpu"):
        raise ValueError(f"tldr_pythia2p8b_dpo: unknown variant {arg!r} (known: 1gpu, pythia1b)")
    return c
