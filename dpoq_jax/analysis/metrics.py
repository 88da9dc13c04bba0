"""Credit-assignment score on tasks with known error positions (synthetic error injection).

For each rejected response with injected error tokens:
  top-1  = is the token with the lowest implicit reward an injected one? With tied minima the
           credit is the fraction of the tied tokens that are injected (the expected hit under a
           random tie break), so ties are neither rewarded nor punished.
  AUROC  = P(−reward of an injected token > −reward of a clean token), ties counting 1/2,
           pooled over all tokens of all responses ("pooled") and averaged over responses that
           have both kinds of token ("mean_per_response").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` detecting `labels` (Mann–Whitney U, tie-aware)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"auroc: scores {s.shape} and labels {y.shape} must be equal-length vectors")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = _average_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def top1_hit(rewards: Sequence[float], error_positions: Sequence[int]) -> float:
    """Share of the minimum-reward tokens that are injected errors (1.0 / 0.0 without ties)."""
    r = np.asarray(rewards, np.float64)
    if r.size == 0:
        raise ValueError("top1_hit: empty response")
    bad = [p for p in error_positions if not 0 <= p < r.size]
    if bad:
        raise ValueError(f"top1_hit: error positions {bad} outside a response of {r.size} tokens")
    argmins = np.flatnonzero(r == r.min())
    return float(np.isin(argmins, list(error_positions)).mean())


def credit_assignment_score(
    rewards: Sequence[Sequence[float]], error_positions: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """top-1 rate and AUROC of −reward as a detector of injected tokens, over many responses."""
    if len(rewards) != len(error_positions):
        raise ValueError(f"{len(rewards)} reward lists but {len(error_positions)} error-position lists")
    hits, per_resp, all_s, all_y = [], [], [], []
    for i, (r, pos) in enumerate(zip(rewards, error_positions, strict=True)):
        if len(pos) == 0:
            continue  # nothing injected: no localisation to score
        try:
            hits.append(top1_hit(r, pos))
        except ValueError as e:
            raise ValueError(f"response {i}: {e}") from None
        y = np.zeros(len(r), bool)
        y[list(pos)] = True
        s = -np.asarray(r, np.float64)
        all_s.append(s)
        all_y.append(y)
        if 0 < y.sum() < len(y):
            per_resp.append(auroc(s, y))
    if not hits:
        raise ValueError("credit_assignment_score: no response has injected error positions")
    s, y = np.concatenate(all_s), np.concatenate(all_y)
    return {
        "n_responses": len(hits),
        "top1": float(np.mean(hits)),
        "auroc_pooled": auroc(s, y) if 0 < y.sum() < len(y) else float("nan"),
        "auroc_mean_per_response": float(np.mean(per_resp)) if per_resp else float("nan"),
        "chance_top1": float(
            np.mean([len(p) / len(r) for r, p in zip(rewards, error_positions, strict=True) if len(p)])
        ),
    }


def error_injection_credit(
    policy, reference, examples, tokenizer, beta: float, **kwargs: Any
) -> dict[str, Any]:
    """Score the rejected responses of error-injection examples (EOS appended) and summarise.

    `examples`: PreferenceExample list with meta["error_positions"] (response token indices).
    """
    from dpoq_jax.analysis.credit import score_responses

    prompts = [tokenizer.encode(e.prompt) for e in examples]
    rejected = [tokenizer.encode(e.rejected) + [tokenizer.eos_token_id] for e in examples]
    for i, e in enumerate(examples):
        if "error_positions" not in e.meta:
            raise ValueError(f"example {i}: meta has no 'error_positions' (not an error-injection example?)")
    scores = score_responses(policy, reference, prompts, rejected, beta, **kwargs)
    out = credit_assignment_score([s.rewards for s in scores], [e.meta["error_positions"] for e in examples])
    out["beta"] = beta
    return out
