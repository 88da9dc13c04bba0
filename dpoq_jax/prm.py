"""Implicit process rewards (Yuan et al. 2024, "Free Process Rewards without Process Labels"), pure.

With token rewards r_t = β(log π(a_t|s_t) − log π_ref(a_t|s_t)), the running sum q_t = Σ_{i≤t} r_i is
a Q value (of the prefix up to t, relative to the prompt's V), so the reward of a step (a run of tokens)
is the difference of q over the step: the sum of its token rewards. Shape letters: B batch, T time,
K steps. `step_ids_BT` holds each token's step 0..K−1 and −1 for tokens outside the response (prompt,
padding); steps are numbered in order and each real step holds at least one token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpoq_jax.tokenq import _f32

Array = jax.Array

AGGREGATES = ("min", "sum", "last", "mean")


@jax.jit
def cumulative_q(rewards_BT: Array, mask_BT: Array) -> Array:
    """q_t = Σ_{i≤t} r_i over the real (mask == 1) tokens -> [B, T] (constant across masked ones)."""
    return jnp.cumsum(_f32(rewards_BT) * mask_BT.astype(_f32(rewards_BT).dtype), axis=-1)


@functools.partial(jax.jit, static_argnames="num_steps")
def step_rewards(rewards_BT: Array, step_ids_BT: Array, num_steps: int) -> tuple[Array, Array]:
    """Segment sums: (reward of each step [B, K], mask of the steps that hold a token [B, K]), K =
    `num_steps` (static; steps with an id ≥ K are dropped). Equal to q at a step's last token minus q
    at the token before the step."""
    onehot_BTK = step_ids_BT[..., None] == jnp.arange(num_steps)
    r_BT = _f32(rewards_BT)
    return jnp.einsum("bt,btk->bk", r_BT, onehot_BTK.astype(r_BT.dtype)), onehot_BTK.any(axis=1)


@functools.partial(jax.jit, static_argnames="how")
def aggregate(step_rewards_BK: Array, step_mask_BK: Array, how: str) -> Array:
    """A response's score from its step rewards -> [B]: "min" (the weakest step, the implicit PRM's
    usual choice), "sum" (= the outcome reward, Σ_t r_t), "last" (the final step's reward), "mean".
    A response without steps scores 0."""
    r_BK = _f32(step_rewards_BK)
    m_BK = step_mask_BK.astype(bool)
    n_B = m_BK.sum(axis=-1)
    if how == "min":
        return jnp.where(n_B > 0, jnp.min(jnp.where(m_BK, r_BK, jnp.inf), axis=-1), 0.0)
    if how == "sum":
        return jnp.sum(jnp.where(m_BK, r_BK, 0.0), axis=-1)
    if how == "last":
        last_B = jnp.maximum(jnp.max(jnp.where(m_BK, jnp.arange(r_BK.shape[-1]), -1), axis=-1), 0)
        return jnp.where(n_B > 0, jnp.take_along_axis(r_BK, last_B[:, None], axis=-1)[:, 0], 0.0)
    if how == "mean":
        return jnp.sum(jnp.where(m_BK, r_BK, 0.0), axis=-1) / jnp.maximum(n_B, 1)
    raise ValueError(f"aggregate: how must be one of {AGGREGATES}, got {how!r}")


VOTE_WEIGHTS = ("sigmoid", "count")


def weighted_vote(
    answers: list[str | None], scores: np.ndarray, weight: str = "sigmoid"
) -> tuple[int, dict[str, float]]:
    """Weighted majority vote over final answers -> (chosen candidate index, total weight per answer).

    Candidates are grouped by their answer string; an answer's weight is Σ sigmoid(score) of its
    candidates ("sigmoid": a reward read as the log-odds of being right, as the implicit PRM's
    cross-entropy training reads it; for very negative scores, e.g. log-likelihoods, sigmoid(s) ≈ e^s,
    a probability-weighted vote) or their number ("count": plain majority). Candidates without an answer
    (None) do not vote. The winner is the heaviest answer, ties going to the answer whose first
    candidate comes first; the chosen candidate is the winner's highest-scoring one (the first on ties).
    With no answer at all, the highest-scoring candidate is chosen.
    """
    if weight not in VOTE_WEIGHTS:
        raise ValueError(f"weighted_vote: weight must be one of {VOTE_WEIGHTS}, got {weight!r}")
    scores = np.asarray(scores, np.float64)
    w = 1.0 / (1.0 + np.exp(-scores)) if weight == "sigmoid" else np.ones_like(scores)
    totals: dict[str, float] = {}
    for a, wi in zip(answers, w, strict=True):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(wi)
    if not totals:
        return int(np.argmax(scores)), totals
    first = {a: answers.index(a) for a in totals}
    best = min(totals, key=lambda a: (-totals[a], first[a]))
    members = [i for i, a in enumerate(answers) if a == best]
    return members[int(np.argmax(scores[members]))], totals
