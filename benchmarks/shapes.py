"""Pythia model shapes and a synthetic TL;DR-like batch of preference pairs.

Shapes are Hugging Face `config.json` dictionaries (the keys Pythia's files carry), so the same
dictionary builds the dpoq_jax config (`models.config_from_hf`) and transformers' `GPTNeoXConfig`.
Weights are random: a benchmark measures speed, not quality.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpoq_jax.data.examples import TokenizedPair

# name -> (layers, width, heads, mlp width). Hyper-parameters of EleutherAI/pythia-* config.json;
# "tiny" is ours, for smoke tests (small vocabulary so that it compiles and runs in seconds).
PYTHIA_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (2, 64, 4, 256),
    "pythia-14m": (6, 128, 4, 512),
    "pythia-70m": (6, 512, 8, 2048),
    "pythia-160m": (12, 768, 12, 3072),
    "pythia-410m": (24, 1024, 16, 4096),
    "pythia-1b": (16, 2048, 8, 8192),
    "pythia-1.4b": (24, 2048, 16, 8192),
    "pythia-2.8b": (32, 2560, 32, 10240),
}
PYTHIA_VOCAB = 50304
TINY_VOCAB = 512


def hf_config(name: str) -> dict[str, Any]:
    """The `config.json` dictionary of a Pythia shape (GPT-NeoX: partial rotary, parallel residual)."""
    if name not in PYTHIA_SHAPES:
        raise KeyError(f"benchmarks/shapes.py: unknown shape {name!r}; known: {sorted(PYTHIA_SHAPES)}")
    layers, width, heads, mlp = PYTHIA_SHAPES[name]
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "num_hidden_layers": layers,
        "hidden_size": width,
        "num_attention_heads": heads,
        "intermediate_size": mlp,
        "vocab_size": TINY_VOCAB if name == "tiny" else PYTHIA_VOCAB,
        "rotary_pct": 0.25,
        "rotary_emb_base": 10000,
        "max_position_embeddings": 2048,
        "use_parallel_residual": True,
        "layer_norm_eps": 1e-5,
        "hidden_act": "gelu",
        "tie_word_embeddings": False,
        "attention_bias": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "initializer_range": 0.02,
    }


def model_config(name: str, **overrides: Any):
    """dpoq_jax's ModelConfig for a Pythia shape (overrides: ModelConfig fields, e.g. remat)."""
    from dpoq_jax import models

    return models.config_from_hf(hf_config(name), where=f"benchmarks/shapes.py:{name}", **overrides)


def torch_config(name: str):
    """transformers' GPTNeoXConfig for a Pythia shape."""
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**hf_config(name))


def body_matmul_params(name: str) -> int:
    """Parameters of the layers, i.e. those used in a matrix product at every position (biases and
    norms counted too: they are tiny). The embedding is a lookup (no FLOPs); the unembedding is
    counted apart, because the lean log-probs apply it only at response positions."""
    layers, width, heads, mlp = PYTHIA_SHAPES[name]
    per_layer = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width
    return layers * per_layer + 2 * width


def forward_flops(name: str, rows: int, row_len: int, unembedded: int | None = None) -> float:
    """FLOPs of one forward pass over `rows` rows of `row_len` positions, padding included (the
    hardware computes it), in PaLM's convention:

        rows * row_len * (2 * body_params + 4 * layers * width * row_len) + 2 * width * vocab * U

    2 FLOPs per parameter per position; dense attention QK^T and AV over the whole row (not halved
    for causality: the kernels compute it); U = positions whose logits are computed (all of them
    unless given). A training step counts 3 forward passes for the policy (forward + backward) and
    1 for a frozen reference. Rematerialisation is not counted (model FLOPs, not hardware FLOPs)."""
    layers, width, _, _ = PYTHIA_SHAPES[name]
    vocab = hf_config(name)["vocab_size"]
    positions = rows * row_len
    unembedded = positions if unembedded is None else unembedded
    body = float(positions) * (2.0 * body_matmul_params(name) + 4.0 * layers * width * row_len)
    return body + 2.0 * width * vocab * float(unembedded)


# ----------------------------------------------------------------------------------------------
# Synthetic TL;DR-like pairs: long prompts (post), short responses (summaries).


@dataclasses.dataclass(frozen=True)
class LengthDistribution:
    """Token lengths drawn from normals, rounded and clipped. Defaults mimic TL;DR summarisation
    with Pythia's tokenizer: a ~300-token post and ~35-token summaries. With these bounds a padded
    row (prompt + one response) is at most 456 tokens and a prefix-shared row (prompt + both
    responses) at most 512, so both fit rows of 512."""

    prompt_mean: float = 300.0
    prompt_sd: float = 80.0
    prompt_min: int = 64
    prompt_max: int = 400
    response_mean: float = 35.0
    response_sd: float = 15.0
    response_min: int = 8
    response_max: int = 56
    row_len: int = 512

    def __post_init__(self):
        if self.prompt_max + 2 * self.response_max > self.row_len:
            raise ValueError(
                f"benchmarks/shapes.py LengthDistribution: prompt_max + 2 * response_max = "
                f"{self.prompt_max + 2 * self.response_max} exceeds row_len={self.row_len}"
            )

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "kind": "rounded normal, clipped to [min, max]; token ids uniform in [2, vocab); "
            "each response ends with EOS (id 0)"
        }


TLDR_LIKE = LengthDistribution()
# Short rows for smoke tests (compiles in seconds); not a benchmark distribution.
SHORT = LengthDistribution(
    prompt_mean=9, prompt_sd=4, prompt_min=2, prompt_max=14, response_mean=4, response_sd=2,
    response_min=1, response_max=6, row_len=32,
)  # fmt: skip
LENGTHS = {"tldr": TLDR_LIKE, "short": SHORT}


def synthetic_pairs(
    num_pairs: int, vocab_size: int, seed: int, dist: LengthDistribution = TLDR_LIKE
) -> list[TokenizedPair]:
    """`num_pairs` TokenizedPairs, deterministic in `seed`. Responses end with EOS (0); other ids
    avoid 0 and 1 so that no EOS or pad hides inside."""
    rng = np.random.default_rng(seed)

    def length(mean: float, sd: float, lo: int, hi: int) -> int:
        return int(np.clip(round(rng.normal(mean, sd)), lo, hi))

    def ids(n: int, eos: bool) -> list[int]:
        x = rng.integers(2, vocab_size, size=n, dtype=np.int32)
        if eos:
            x[-1] = 0
        return x.tolist()

    pairs = []
    for _ in range(num_pairs):
        d = dist
        prompt = ids(length(d.prompt_mean, d.prompt_sd, d.prompt_min, d.prompt_max), eos=False)
        chosen = ids(length(d.response_mean, d.response_sd, d.response_min, d.response_max), eos=True)
        rejected = ids(length(d.response_mean, d.response_sd, d.response_min, d.response_max), eos=True)
        pairs.append(TokenizedPair(prompt, chosen, rejected, {"source": "synthetic", "line": len(pairs)}))
    return pairs


def real_tokens(pairs) -> int:
    """Non-padding tokens of the padded layout (prompt twice, each response once): the unit of
    tokens/s for every layout, so that tokens/s ratios equal pairs/s ratios."""
    return int(sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs))
