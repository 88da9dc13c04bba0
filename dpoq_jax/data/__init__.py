"""dpoq_jax.data: preference/SFT sources, tokenization, batch layouts, loader, synthetic tasks.

Numpy-only at import time (no JAX, no tensorflow_datasets, no transformers), so that it loads on
every machine; the TL;DR builder and HF tokenizers are imported when used.
"""

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample, SFTExample, TokenizedPair, TokenizedSFT
from dpoq_jax.data.layouts import LAYOUTS, preference_batch, sft_batch
from dpoq_jax.data.loader import Loader, LoaderState
from dpoq_jax.data.sources import SourceConfig, load_examples, load_tokenizer
from dpoq_jax.data.synthetic import DenseRewardTask, ErrorInjectionTask, SyntheticTokenizer, make_task
from dpoq_jax.data.tokenize import TokenizeConfig, TokenizeStats, tokenize_all

__all__ = [
    "LAYOUTS", "DataError", "DenseRewardTask", "ErrorInjectionTask", "ErrorPolicy", "Loader",
    "LoaderState", "PreferenceExample", "SFTExample", "SourceConfig", "SyntheticTokenizer", "TokenizeConfig",
    "TokenizeStats", "TokenizedPair", "TokenizedSFT", "load_examples", "load_tokenizer", "make_task",
    "preference_batch", "sft_batch", "tokenize_all",
]
