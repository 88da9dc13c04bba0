"""Greedy decoding and sampling (temperature, top-k, top-p), jitted, batched, KV-cached.

One static-shape `lax.while_loop` over positions; it stops early once every row has emitted EOS or
max_new_tokens tokens. Prompts of different lengths: see dpoq_jax/decode/core.py (teacher forcing,
no padding inside the cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax.decode.core import (
    DecodeModel,
    Generation,
    as_dtype,
    log_softmax32,
    model_vocab_size,
    pack_prompts,
    reference_scores,
    response_index,
    response_lists,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 switch those filters off."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = 2
    pad_id: int = 0
    cache_dtype: str | None = None  # None: the model's compute dtype

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def filter_logits(logits_BV: Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to -inf.

    Ties at a threshold are all kept. The most likely token always survives top-p.
    """
    x_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k > 0 and top_k < x_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(x_BV, top_k)[0][:, -1:]
        x_BV = jnp.where(x_BV < kth_B1, -jnp.inf, x_BV)
    if top_p < 1.0:
        sorted_BV = -jnp.sort(-x_BV, axis=-1)
        p_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(p_BV, axis=-1) - p_BV  # mass of the strictly more likely tokens
        keep_BV = before_BV < top_p
        thr_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        x_BV = jnp.where(x_BV < thr_B1, -jnp.inf, x_BV)
    return x_BV


def _sample_core(
    graphdef: Any, state: Any, ids_BP: Array, lens_B: Array, key: Array, cfg: SampleConfig, prefill_len: int
) -> tuple[Array, Array, Array]:
    model = nnx.merge(graphdef, state)
    B, P = ids_BP.shape
    R = cfg.max_new_tokens
    T = P + R
    seq_BT = jnp.full((B, T), cfg.pad_id, jnp.int32).at[:, :P].set(ids_BP)
    cache = model.init_cache(B, T, as_dtype(cfg.cache_dtype))
    pos = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32), (B, prefill_len))
    logits_BTV, cache = model.decode(seq_BT[:, :prefill_len], pos, cache)
    gen_BT = jnp.zeros((B, T), bool)
    lp_BT = jnp.zeros((B, T), jnp.float32)
    done_B = jnp.zeros((B,), bool)

    def cond(c):
        t, *_, done_B, _ = c
        return (t < T) & ~jnp.all(done_B)

    def body(c):
        t, seq_BT, gen_BT, lp_BT, cache, logits_BV, done_B, key = c
        key, sub = jax.random.split(key)
        if cfg.temperature == 0.0:
            tok_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        else:
            x_BV = filter_logits(logits_BV, cfg.temperature, cfg.top_k, cfg.top_p)
            tok_B = jax.random.categorical(sub, x_BV, axis=-1).astype(jnp.int32)
        forced_B = t < lens_B
        gen_B = ~forced_B & ~done_B
        tok_B = jnp.where(forced_B, seq_BT[:, t], jnp.where(done_B, cfg.pad_id, tok_B))
        lp_B = jnp.take_along_axis(log_softmax32(logits_BV), tok_B[:, None], axis=-1)[:, 0]
        seq_BT = seq_BT.at[:, t].set(tok_B)
        gen_BT = gen_BT.at[:, t].set(gen_B)
        lp_BT = lp_BT.at[:, t].set(jnp.where(gen_B, lp_B, 0.0))
        done_B = done_B | (gen_B & ((tok_B == cfg.eos_id) | (t - lens_B == R - 1)))
        logits_B1V, cache = model.decode(tok_B[:, None], jnp.full((B, 1), t, jnp.int32), cache)
        return t + 1, seq_BT, gen_BT, lp_BT, cache, logits_B1V[:, 0], done_B, key

    c = (jnp.asarray(prefill_len, jnp.int32), seq_BT, gen_BT, lp_BT, cache, logits_BTV[:, -1], done_B, key)
    _, seq_BT, gen_BT, lp_BT, *_ = jax.lax.while_loop(cond, body, c)
    idx_BR = response_index(lens_B, R)
    take = lambda x: jnp.take_along_axis(x, idx_BR, axis=1)  # noqa: E731
    return take(seq_BT), take(gen_BT).astype(jnp.float32), take(lp_BT)


_sample_jit = jax.jit(_sample_core, static_argnums=(0, 5, 6))


def generate(
    model: DecodeModel,
    prompts: Sequence[Sequence[int]],
    config: SampleConfig,
    *,
    seed: int = 0,
    ref_model: DecodeModel | None = None,
    beta: float = 0.1,
) -> Generation:
    """Greedy (temperature 0) or sampled responses for a batch of prompts (lists of token ids).

    With `ref_model`, the responses are also scored by the reference (one uncached pass) and the
    per-token implicit rewards β(log π − log π_ref) returned.
    """
    V = model_vocab_size(model)
    prompts_ = pack_prompts(prompts, config.pad_id, V)
    graphdef, state = nnx.split(model)
    tok, mask, lp = _sample_jit(
        graphdef,
        state,
        jnp.asarray(prompts_.ids_BP),
        jnp.asarray(prompts_.lens_B),
        jax.random.key(seed),
        config,
        prompts_.min_len,
    )
    tok, mask, lp = np.asarray(tok), np.asarray(mask), np.asarray(lp)
    tok = np.where(mask > 0, tok, config.pad_id)
    out = Generation(tokens=tok, mask=mask, logps=lp, score=lp.sum(-1))
    if ref_model is not None:
        out.ref_logps, out.rewards = reference_scores(
            ref_model, prompts_, tok, mask, lp, beta, config.pad_id, V, config.cache_dtype
        )
    return out


def sample_responses(
    model: DecodeModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
) -> list[list[int]]:
    """`generate` with lists in and out: one sampled response per prompt (EOS included when emitted)."""
    cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    gen = generate(model, prompts, cfg, seed=seed)
    return response_lists(gen.tokens, gen.mask)
