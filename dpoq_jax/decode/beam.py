"""Beam search (likelihood search) and, with the same mechanics, reward-guided search.

Mechanics: K beams per prompt live as B·K model rows. Every step each beam proposes every token;
the K best (beam score + increment) candidates of each prompt survive, and the caches, token
histories and per-token log-probs are gathered from their parent beams. A finished beam (EOS or
max_new_tokens reached) stays in the beam set with one candidate: padding at increment 0, so its
score stops accumulating and it competes with the running beams at its final score. Because
log-probabilities are <= 0, a running beam can only lose score, so with K at least the number of
live prefixes this is exhaustive search.

Ranking uses the raw score during the search; the optional length penalty (score / length**alpha,
length counting EOS) reorders the final K beams only.
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
    cache_batch_axes,
    check_same_vocab,
    log_softmax32,
    model_vocab_size,
    pack_prompts,
    reference_scores,
    reorder_cache,
    response_lists,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BeamConfig:
    num_beams: int = 4
    max_new_tokens: int = 64
    length_penalty: float = 0.0  # alpha in score / length**alpha; 0 = none
    eos_id: int = 2
    pad_id: int = 0
    cache_dtype: str | None = None  # None: the model's compute dtype

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


def _beam_core(
    graphdef: Any,
    state: Any,
    ref_graphdef: Any,
    ref_state: Any,
    ids_BP: Array,
    lens_B: Array,
    beta: Array,
    cfg: BeamConfig,
    prefill_len: int,
    axes: tuple,
    ref_axes: tuple,
) -> dict[str, Array]:
    """Shared beam loop. With a reference (ref_graphdef not None) it is reward-guided search."""
    guided = ref_graphdef is not None
    model = nnx.merge(graphdef, state)
    ref = nnx.merge(ref_graphdef, ref_state) if guided else None
    B, P = ids_BP.shape
    K, R = cfg.num_beams, cfg.max_new_tokens
    T, N = P + R, B * K
    dtype = as_dtype(cfg.cache_dtype)

    seq_BKT = jnp.full((B, K, T), cfg.pad_id, jnp.int32).at[:, :, :P].set(ids_BP[:, None, :])
    pos = jnp.broadcast_to(jnp.arange(prefill_len, dtype=jnp.int32), (N, prefill_len))
    prefill = seq_BKT.reshape(N, T)[:, :prefill_len]
    logits_NTV, cache = model.decode(prefill, pos, model.init_cache(N, T, dtype))
    V = logits_NTV.shape[-1]
    if guided:
        ref_logits_NTV, ref_cache = ref.decode(prefill, pos, ref.init_cache(N, T, dtype))
        check_same_vocab(V, ref_logits_NTV.shape[-1])
        ref_logits_NV = ref_logits_NTV[:, -1]
    else:
        ref_cache, ref_logits_NV = None, None
    # Only beam 0 is alive at first: the K copies of a prompt would otherwise propose K duplicates.
    score_BK = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)[None, :].repeat(B, 0)
    zeros = jnp.zeros((B, K, T), jnp.float32)
    c = dict(
        t=jnp.asarray(prefill_len, jnp.int32),
        seq=seq_BKT,
        gen=jnp.zeros((B, K, T), bool),
        lp=zeros,
        rlp=zeros,
        score=score_BK,
        done=jnp.zeros((B, K), bool),
        cache=cache,
        logits=logits_NTV[:, -1],
        ref_cache=ref_cache,
        ref_logits=ref_logits_NV,
    )
    pad_only_V = jnp.where(jnp.arange(V) == cfg.pad_id, 0.0, -jnp.inf)
    b_idx = jnp.arange(B)[:, None]

    def cond(c):
        return (c["t"] < T) & ~jnp.all(c["done"] | ~jnp.isfinite(c["score"]))

    def body(c):
        t = c["t"]
        lp_BKV = log_softmax32(c["logits"]).reshape(B, K, V)
        if guided:
            rlp_BKV = log_softmax32(c["ref_logits"]).reshape(B, K, V)
            # PAPER §4: partial score Σ_t [r_t + β log π_ref(a_t|s_t)] with r_t = β(log π − log π_ref).
            inc_BKV = beta * (lp_BKV - rlp_BKV) + beta * rlp_BKV
        else:
            rlp_BKV = jnp.zeros_like(lp_BKV)
            inc_BKV = lp_BKV
        inc_BKV = jnp.where(c["done"][..., None], pad_only_V, inc_BKV)
        cand_BX = (c["score"][..., None] + inc_BKV).reshape(B, K * V)
        top_BK, flat_BK = jax.lax.top_k(cand_BX, K)
        parent_BK, tok_BK = flat_BK // V, (flat_BK % V).astype(jnp.int32)
        forced_B1 = (t < lens_B)[:, None]
        # Still inside a prompt: every beam keeps itself and is fed the prompt's next token.
        parent_BK = jnp.where(forced_B1, jnp.arange(K)[None, :], parent_BK)
        tok_BK = jnp.where(forced_B1, c["seq"][:, :, t], tok_BK)
        score_BK = jnp.where(forced_B1, c["score"], top_BK)
        was_done_BK = c["done"][b_idx, parent_BK]
        gen_BK = ~forced_B1 & ~was_done_BK
        tok_BK = jnp.where(was_done_BK, cfg.pad_id, tok_BK)
        lp_tok = lp_BKV[b_idx, parent_BK, tok_BK]
        rlp_tok = rlp_BKV[b_idx, parent_BK, tok_BK]

        def hist(x, new):
            return x[b_idx, parent_BK].at[:, :, t].set(new)

        out = dict(t=t + 1, score=score_BK)
        out["seq"] = hist(c["seq"], tok_BK)
        out["gen"] = hist(c["gen"], gen_BK)
        out["lp"] = hist(c["lp"], jnp.where(gen_BK, lp_tok, 0.0))
        out["rlp"] = hist(c["rlp"], jnp.where(gen_BK, rlp_tok, 0.0))
        out["done"] = was_done_BK | (gen_BK & ((tok_BK == cfg.eos_id) | (t - lens_B[:, None] == R - 1)))
        rows_N = (b_idx * K + parent_BK).reshape(N)
        tok_N1 = tok_BK.reshape(N, 1)
        pos_N1 = jnp.full((N, 1), t, jnp.int32)
        logits_N1V, out["cache"] = model.decode(tok_N1, pos_N1, reorder_cache(c["cache"], rows_N, axes))
        out["logits"] = logits_N1V[:, 0]
        if guided:
            ref_logits_N1V, out["ref_cache"] = ref.decode(
                tok_N1, pos_N1, reorder_cache(c["ref_cache"], rows_N, ref_axes)
            )
            out["ref_logits"] = ref_logits_N1V[:, 0]
        else:
            out["ref_cache"], out["ref_logits"] = None, None
        return out

    c = jax.lax.while_loop(cond, body, c)
    idx_BKR = (lens_B[:, None, None] + jnp.arange(R, dtype=jnp.int32)).repeat(K, 1)
    take = lambda x: jnp.take_along_axis(x, idx_BKR, axis=2)  # noqa: E731
    mask = take(c["gen"]).astype(jnp.float32)
    length_BK = jnp.maximum(mask.sum(-1), 1.0)
    rank_BK = c["score"] / length_BK**cfg.length_penalty if cfg.length_penalty else c["score"]
    rank_BK = jnp.where(jnp.isfinite(c["score"]), rank_BK, -jnp.inf)
    order_BK = jnp.argsort(-rank_BK, axis=1, stable=True)
    sort = lambda x: jnp.take_along_axis(x, order_BK.reshape(B, K, *([1] * (x.ndim - 2))), axis=1)  # noqa: E731
    return dict(
        tokens=sort(take(c["seq"])),
        mask=sort(mask),
        lp=sort(take(c["lp"])),
        rlp=sort(take(c["rlp"])),
        score=sort(rank_BK),
        valid=sort(jnp.isfinite(c["score"])),
        V=jnp.asarray(V),
    )


_beam_jit = jax.jit(_beam_core, static_argnums=(0, 2, 7, 8, 9, 10))


def _run(
    model: DecodeModel,
    ref: DecodeModel | None,
    prompts: Sequence[Sequence[int]],
    cfg: BeamConfig,
    beta: float,
) -> tuple[dict[str, np.ndarray], Any]:
    prompts_ = pack_prompts(prompts, cfg.pad_id, model_vocab_size(model))
    graphdef, state = nnx.split(model)
    dtype = as_dtype(cfg.cache_dtype)
    axes = cache_batch_axes(model, dtype)
    if ref is not None:
        ref_graphdef, ref_state = nnx.split(ref)
        ref_axes = cache_batch_axes(ref, dtype)
    else:
        ref_graphdef, ref_state, ref_axes = None, None, ()
    out = _beam_jit(
        graphdef,
        state,
        ref_graphdef,
        ref_state,
        jnp.asarray(prompts_.ids_BP),
        jnp.asarray(prompts_.lens_B),
        jnp.float32(beta),
        cfg,
        prompts_.min_len,
        axes,
        ref_axes,
    )
    out = {k: np.asarray(v) for k, v in out.items()}
    out["tokens"] = np.where(out["mask"] > 0, out["tokens"], cfg.pad_id)
    return out, prompts_


def beam_search(
    model: DecodeModel,
    prompts: Sequence[Sequence[int]],
    config: BeamConfig,
    *,
    ref_model: DecodeModel | None = None,
    beta: float = 0.1,
) -> Generation:
    """Likelihood beam search. Returns [B, K] beams, best first, with their policy log-probs.

    With `ref_model`, the final beams are scored by the reference (one uncached pass) and the
    per-token implicit rewards β(log π − log π_ref) are returned too (`Generation.reward_sum`).
    """
    out, prompts_ = _run(model, None, prompts, config, beta)
    gen = Generation(
        tokens=out["tokens"], mask=out["mask"], logps=out["lp"], score=out["score"], valid=out["valid"]
    )
    if ref_model is not None:
        gen.ref_logps, gen.rewards = reference_scores(
            ref_model,
            prompts_,
            gen.tokens,
            gen.mask,
            gen.logps,
            beta,
            config.pad_id,
            int(out["V"]),
            config.cache_dtype,
        )
    return gen


def best_beams(
    model: DecodeModel,
    prompts: Sequence[Sequence[int]],
    *,
    num_beams: int,
    max_new_tokens: int,
    batch: int = 64,
) -> list[list[int]]:
    """The best beam per prompt as a list (likelihood search, no length penalty), `batch` prompts at a
    time."""
    cfg = BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        gen = beam_search(model, prompts[s : s + batch], cfg)
        out += response_lists(gen.tokens[:, 0], gen.mask[:, 0])
    return out
