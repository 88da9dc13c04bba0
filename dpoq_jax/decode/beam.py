"""Beam search (likelihood search) and, with the same mechanics, reward-guided search.

The mechanics are transformers' (`GenerationMixin._beam_search`, v5), so that a length penalty means
what it means there. K beams per prompt live as B·K model rows. Every step each running beam proposes
every token and the 2K best candidates of a prompt (by raw summed log-prob) are taken; the K best of
them that did not finish become the next running beams (caches, token histories and per-token
log-probs gathered from their parents). A candidate among the K best that finishes (EOS, or
max_new_tokens reached) enters the prompt's K finished hypotheses with the score

    score = Σ_t log π(a_t|s_t) / n**α,   n = generated tokens (EOS included),  α = length_penalty,

and the K best finished hypotheses are returned, best first. A prompt stops taking hypotheses when
none can improve (`early_stopping`): False (transformers' default) compares the best running beam,
penalised at its current length, with the worst finished one once K have finished; True stops at K
finished; "never" penalises the running beam at max_new_tokens when α > 0. With α = 0 the ranking
is the raw log-likelihood, and False and "never" are exact (scores only fall): with K at least the
number of live prefixes the search is exhaustive. transformers' own default α is 1.0; ours is 0
(pure likelihood search).
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
    length_penalty: float = 0.0  # α in score / n**α (transformers' meaning); 0 = none
    early_stopping: bool | str = False  # transformers' False / True / "never"
    eos_id: int = 2
    pad_id: int = 0
    cache_dtype: str | None = None  # None: the model's compute dtype

    def __post_init__(self):
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.early_stopping not in (False, True, "never"):
            raise ValueError(f"early_stopping must be False, True or 'never', got {self.early_stopping!r}")


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
    K, R, alpha = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty
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
    running = dict(seq=seq_BKT, gen=jnp.zeros((B, K, T), bool), lp=zeros, rlp=zeros)
    c = dict(
        t=jnp.asarray(prefill_len, jnp.int32),
        run=running,
        score=score_BK,  # raw summed increments of the running beams
        fin=jax.tree.map(jnp.copy, running),
        fin_score=jnp.full((B, K), -jnp.inf),  # length-penalised scores of the finished hypotheses
        open=jnp.ones((B,), bool),  # the prompt still takes finished hypotheses
        cache=cache,
        logits=logits_NTV[:, -1],
        ref_cache=ref_cache,
        ref_logits=ref_logits_NV,
    )
    b_idx = jnp.arange(B)[:, None]
    top_K = jnp.arange(2 * K) < K  # candidates ranked among the K best may finish

    def cond(c):
        alive = c["open"] & jnp.any(jnp.isfinite(c["score"]), axis=1)
        return (c["t"] < T) & jnp.any(alive)

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
        cand_BX = (c["score"][..., None] + inc_BKV).reshape(B, K * V)
        top_BC, flat_BC = jax.lax.top_k(cand_BX, 2 * K)  # C = 2K candidates, best first
        parent_BC, tok_BC = flat_BC // V, (flat_BC % V).astype(jnp.int32)
        n_B1 = (t + 1 - lens_B)[:, None]  # tokens generated, this one included
        forced_B1 = n_B1 <= 0
        hits_BC = ~forced_B1 & ((tok_BC == cfg.eos_id) | (n_B1 == R))

        def extend(x, parent, new):
            return x[b_idx, parent].at[:, :, t].set(new)

        lp_tok = lp_BKV[b_idx, parent_BC, tok_BC]
        rlp_tok = rlp_BKV[b_idx, parent_BC, tok_BC]
        gen_BC = jnp.broadcast_to(~forced_B1, tok_BC.shape)
        cand = dict(
            seq=extend(c["run"]["seq"], parent_BC, tok_BC),
            gen=extend(c["run"]["gen"], parent_BC, gen_BC),
            lp=extend(c["run"]["lp"], parent_BC, jnp.where(gen_BC, lp_tok, 0.0)),
            rlp=extend(c["run"]["rlp"], parent_BC, jnp.where(gen_BC, rlp_tok, 0.0)),
        )
        # The next running beams: the K best candidates that did not finish.
        keep_BC = jnp.where(hits_BC, -jnp.inf, top_BC)
        score_BK, pick_BK = jax.lax.top_k(keep_BC, K)
        out = dict(t=t + 1, score=score_BK)
        out["run"] = jax.tree.map(lambda x: x[b_idx, pick_BK], cand)
        parent_BK = parent_BC[b_idx, pick_BK]
        # Still inside a prompt: every beam keeps itself (its history holds the prompt's next token).
        out["run"] = jax.tree.map(lambda f, x: jnp.where(forced_B1[..., None], f, x), c["run"], out["run"])
        out["score"] = jnp.where(forced_B1, c["score"], score_BK)
        parent_BK = jnp.where(forced_B1, jnp.arange(K)[None, :], parent_BK)
        tok_BK = out["run"]["seq"][:, :, t]
        # Finished candidates among the K best join the finished set with their penalised score.
        full_B1 = jnp.all(jnp.isfinite(c["fin_score"]), axis=1, keepdims=True)
        takes_B1 = c["open"][:, None] & ~(full_B1 & (cfg.early_stopping is True))
        new_BC = jnp.where(hits_BC & top_K & takes_B1, top_BC / jnp.maximum(n_B1, 1) ** alpha, -jnp.inf)
        fin_score_BX = jnp.concatenate([c["fin_score"], new_BC], axis=1)
        out["fin_score"], best_BK = jax.lax.top_k(fin_score_BX, K)
        out["fin"] = jax.tree.map(
            lambda f, x: jnp.concatenate([f, x], axis=1)[b_idx, best_BK], c["fin"], cand
        )
        # Can a running beam still beat the worst finished hypothesis? (transformers' heuristic)
        n_best = R if (cfg.early_stopping == "never" and alpha > 0) else jnp.maximum(n_B1[:, 0], 1)
        best_run_B = out["score"][:, 0] / jnp.asarray(n_best, jnp.float32) ** alpha
        worst_B = jnp.where(jnp.all(jnp.isfinite(out["fin_score"]), 1), out["fin_score"][:, -1], -jnp.inf)
        improvable_B = forced_B1[:, 0] | (best_run_B > worst_B)
        if cfg.early_stopping is True:
            improvable_B = improvable_B & ~jnp.all(jnp.isfinite(out["fin_score"]), 1)
        out["open"] = c["open"] & improvable_B
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
    fin = c["fin"]
    return dict(
        tokens=take(fin["seq"]),
        mask=take(fin["gen"]).astype(jnp.float32),
        lp=take(fin["lp"]),
        rlp=take(fin["rlp"]),
        score=c["fin_score"],
        valid=jnp.isfinite(c["fin_score"]),
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
    length_penalty: float = 0.0,
    batch: int = 64,
) -> list[list[int]]:
    """The best beam per prompt as a list (likelihood search, length penalty α as in `BeamConfig`),
    `batch` prompts at a time."""
    cfg = BeamConfig(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        gen = beam_search(model, prompts[s : s + batch], cfg)
        out += response_lists(gen.tokens[:, 0], gen.mask[:, 0])
    return out
