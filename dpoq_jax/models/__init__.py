"""dpoq_jax.models: one Flax NNX decoder for GPT-NeoX/Pythia, Llama/Mistral, Qwen2 and GPT-2, with Hugging
Face checkpoints in and out (see docs/models.md)."""

from dpoq_jax.models.decoder import (
    Decoder,
    abstract_split,
    attention_mask,
    default_dtype,
    split_params,
)
from dpoq_jax.models.model_config import ModelConfig, config_from_hf, config_to_hf

__all__ = [
    "Decoder",
    "ModelConfig",
    "abstract_split",
    "attention_mask",
    "config_from_hf",
    "config_to_hf",
    "default_dtype",
    "split_params",
]
