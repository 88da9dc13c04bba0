"""Per-token credit assignment: implicit rewards (and Q, V) of given responses under a policy/reference.

Library functions take token ids and models (or logits), not files, so experiments can call them.
Token t of a response is the action a_t in state s_t = (prompt, response[:t]):
    logp_t = log π(a_t|s_t), ref_logp_t = log π_ref(a_t|s_t), reward_t = β(logp_t − ref_logp_t),
    q_t = Q(s_t, a_t) = β·logit_π(a_t|s_t), v_t = V(s_t) = β·logsumexp logits_π(·|s_t)
(Q and V are defined up to a per-state shift; Q − V = β log π is not.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax import tokenq
from dpoq_jax.decode.core import (
    DecodeModel,
    as_dtype,
    check_same_vocab,
    forward_logits,
    model_vocab_size,
    pack_prompts,
)

Array = jax.Array


@dataclasses.dataclass
class TokenScores:
    """Per-token values of one response (numpy float arrays of its length)."""

    ids: list[int]
    logps: np.ndarray
    ref_logps: np.ndarray
    rewards: np.ndarray
    q: np.ndarray | None = None
    v: np.ndarray | None = None

    @property
    def reward_sum(self) -> float:
        return float(self.rewards.sum())

    def to_dict(self, tokens: Sequence[str] | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"ids": [int(i) for i in self.ids]}
        if tokens is not None:
            d["tokens"] = list(tokens)
        for k in ("logps", "ref_logps", "rewards", "q", "v"):
            x = getattr(self, k)
            if x is not None:
                d[k] = [float(a) for a in x]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TokenScores:
        arr = lambda k: None if d.get(k) is None else np.asarray(d[k], np.float64)  # noqa: E731
        return cls(
            ids=[int(i) for i in d["ids"]],
            logps=arr("logps"),
            ref_logps=arr("ref_logps"),
            rewards=arr("rewards"),
            q=arr("q"),
            v=arr("v"),
        )


def token_scores_from_logits(
    logits_RV: Array, ref_logits_RV: Array, response_ids: Sequence[int], beta: float, with_qv: bool = False
) -> TokenScores:
    """Scores from the logits of the R states that predict the R response tokens (pure arrays)."""
    check_same_vocab(logits_RV.shape[-1], ref_logits_RV.shape[-1])
    ids = jnp.asarray(response_ids, jnp.int32)[None]
    lp = tokenq.token_logps(jnp.asarray(logits_RV)[None], ids)[0]
    rlp = tokenq.token_logps(jnp.asarray(ref_logits_RV)[None], ids)[0]
    out = TokenScores(
        list(map(int, response_ids)), np.asarray(lp), np.asarray(rlp), np.asarray(beta * (lp - rlp))
    )
    if with_qv:
        q_RV = tokenq.implicit_q(jnp.asarray(logits_RV), beta)
        out.q = np.asarray(jnp.take_along_axis(q_RV, ids[0][:, None], axis=-1)[:, 0])
        out.v = np.asarray(tokenq.implicit_v(jnp.asarray(logits_RV)[None], beta)[0])
    return out


def _row_values(
    graphdef: Any, state: Any, rgraphdef: Any, rstate: Any, tokens_NT: Array, beta: Array, cache_dtype: Any
) -> dict[str, Array]:
    """Column t holds the values of token t (predicted by the logits at t − 1); column 0 is unused."""
    logits = forward_logits(nnx.merge(graphdef, state), tokens_NT, cache_dtype)[:, :-1]
    ref_logits = forward_logits(nnx.merge(rgraphdef, rstate), tokens_NT, cache_dtype)[:, :-1]
    check_same_vocab(logits.shape[-1], ref_logits.shape[-1])
    targets = tokens_NT[:, 1:]
    pad = lambda x: jnp.pad(x, ((0, 0), (1, 0)))  # noqa: E731
    q = tokenq.implicit_q(logits, beta)
    return dict(
        lp=pad(tokenq.token_logps(logits, targets)),
        rlp=pad(tokenq.token_logps(ref_logits, targets)),
        q=pad(jnp.take_along_axis(q, targets[..., None], axis=-1)[..., 0]),
        v=pad(tokenq.implicit_v(logits, beta)),
    )


_row_values_jit = jax.jit(_row_values, static_argnums=(0, 2, 6))


def score_responses(
    policy: DecodeModel,
    reference: DecodeModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    beta: float,
    *,
    with_qv: bool = False,
    pad_id: int = 0,
    cache_dtype: Any = None,
    names: Sequence[str] | None = None,
    batch_size: int = 32,
) -> list[TokenScores]:
    """Per-token rewards (and Q, V) of each (prompt, response) pair, one uncached pass per model.

    `names` (one per pair, e.g. "pairs.jsonl line 3 rejected") is used in error messages;
    `batch_size` rows go through the models at a time.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    where = list(names) if names is not None else [f"response {i}" for i in range(len(responses))]
    V, rV = model_vocab_size(policy), model_vocab_size(reference)
    check_same_vocab(V, rV)
    for i, r in enumerate(responses):
        if len(r) == 0:
            raise ValueError(f"{where[i]}: empty response; there is no token to score")
        bad = [(j, int(t)) for j, t in enumerate(r) if not 0 <= int(t) < V]
        if bad:
            raise ValueError(f"{where[i]}: token (index, id) {bad} outside the model vocabulary of size {V}")
    packed = pack_prompts(prompts, pad_id, V)
    R = max(len(r) for r in responses)
    rows = np.full((len(prompts), packed.ids_BP.shape[1] + R), pad_id, np.int32)
    for n, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        rows[n, : len(p)] = p
        rows[n, len(p) : len(p) + len(r)] = r
    graphdef, state = nnx.split(policy)
    rgraphdef, rstate = nnx.split(reference)
    # Fixed-size chunks (the last one padded with copies) keep one compiled shape and bound the
    # [batch, T, V] float32 logits in memory.
    N, bs = rows.shape[0], min(batch_size, rows.shape[0])
    chunks = []
    for s in range(0, N, bs):
        chunk = rows[s : s + bs]
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], bs - len(chunk), axis=0)])
        v = _row_values_jit(
            graphdef, state, rgraphdef, rstate, jnp.asarray(chunk), jnp.float32(beta), as_dtype(cache_dtype)
        )
        chunks.append({k: np.asarray(x) for k, x in v.items()})
    vals = {k: np.concatenate([c[k] for c in chunks])[:N] for k in chunks[0]}
    out = []
    for n, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        sl = slice(len(p), len(p) + len(r))
        lp, rlp = vals["lp"][n, sl], vals["rlp"][n, sl]
        s = TokenScores([int(t) for t in r], lp, rlp, beta * (lp - rlp))
        if with_qv:
            s.q, s.v = vals["q"][n, sl], vals["v"][n, sl]
        out.append(s)
    return out


def edit_span(response: Sequence[int], start: int, end: int, replacement: Sequence[int]) -> list[int]:
    """response[:start] + replacement + response[end:] (the paper's inserted errors), checked."""
    if not 0 <= start <= end <= len(response):
        raise ValueError(
            f"edit_span: need 0 <= start <= end <= {len(response)}, got start={start}, end={end}"
        )
    return list(response[:start]) + list(replacement) + list(response[end:])


def score_edit(
    policy: DecodeModel,
    reference: DecodeModel,
    prompt: Sequence[int],
    response: Sequence[int],
    start: int,
    end: int,
    replacement: Sequence[int],
    beta: float,
    **kwargs: Any,
) -> dict[str, Any]:
    """Score a response and its edited version; `span` is the edited token range in the new response."""
    edited = edit_span(response, start, end, replacement)
    original, new = score_responses(policy, reference, [prompt, prompt], [response, edited], beta, **kwargs)
    return {"original": original, "edited": new, "span": (start, start + len(replacement))}


def response_logits(
    model: DecodeModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    max_floats: float = 2e8,
) -> list[np.ndarray]:
    """Logits [R_i, V] of the states that predict each response token (for exact per-state sums, e.g.
    tokenq.expected_ref_reward over the whole vocabulary).

    Batches hold at most `max_floats` logits (B·T·V), so a 50k vocabulary stays within memory.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"response_logits: {len(prompts)} prompts for {len(responses)} responses")
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, rows):
        return forward_logits(nnx.merge(graphdef, state), rows)

    V = model_vocab_size(model)
    T = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True))
    batch = max(1, int(max_floats // (T * V)))
    out: list[np.ndarray] = []
    for s in range(0, len(prompts), batch):
        ps, rs = prompts[s : s + batch], responses[s : s + batch]
        rows = np.zeros((len(ps), T), np.int32)  # right-padded: padding never precedes a real token
        for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
            rows[i, : len(p) + len(r)] = list(p) + list(r)
        logits = np.asarray(f(state, rows), np.float32)
        for i, (p, r) in enumerate(zip(ps, rs, strict=True)):
            out.append(logits[i, len(p) - 1 : len(p) - 1 + len(r)])
    return out
