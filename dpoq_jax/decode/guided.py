"""Reward-guided search (PAPER §4): beam search whose partial-sequence score is the implicit reward.

A partial response a_0..a_K is scored by  Σ_{t≤K} [ r_t + β log π_ref(a_t|s_t) ]  with the DPO
implicit token reward r_t = β(log π(a_t|s_t) − log π_ref(a_t|s_t)), running the policy and the
reference side by side, each with its own KV cache, with the same beam mechanics as
`beam_search` (dpoq_jax/decode/beam.py).

Why it returns what likelihood beam search returns: the bracket equals β log π(a_t|s_t) token by
token (Eq. 10 of the paper with Q* = β log π* up to V*, which telescopes), so every partial score
is β times the policy log-likelihood of the prefix. Multiplying all scores by β > 0 does not change
which K candidates are the best at any step, so the two searches keep the same beams and end with
the same sequences; the scores differ by the factor β. The paper's point: beam search on a DPO
policy *is* search on the learned reward, which is why more beams can over-optimise that reward.
"""

from __future__ import annotations

from collections.abc import Sequence

from dpoq_jax.decode.beam import BeamConfig, _run
from dpoq_jax.decode.core import DecodeModel, Generation


def reward_guided_search(
    policy: DecodeModel,
    reference: DecodeModel,
    prompts: Sequence[Sequence[int]],
    config: BeamConfig,
    *,
    beta: float,
) -> Generation:
    """Beams [B, K], best first; `score` = Σ[r_t + β log π_ref], `rewards` = r_t, `ref_logps` tracked live."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0 for reward-guided search, got {beta}")
    out, _ = _run(policy, reference, prompts, config, beta)
    rewards = beta * (out["lp"] - out["rlp"]) * out["mask"]
    return Generation(
        tokens=out["tokens"],
        mask=out["mask"],
        logps=out["lp"],
        score=out["score"],
        ref_logps=out["rlp"],
        rewards=rewards,
        valid=out["valid"],
    )
