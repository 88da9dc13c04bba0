"""Metrics and statistics of the analyses and experiments.

Credit-assignment score on tasks with known error positions (synthetic error injection); for each
rejected response with injected error tokens:
  top-1  = is the token with the lowest implicit reward an injected one? With tied minima the
           credit is the fraction of the tied tokens that are injected (the expected hit under a
           random tie break), so ties are neither rewarded nor punished.
  AUROC  = P(−reward of an injected token > −reward of a clean token), ties counting 1/2,
           pooled over all tokens of all responses ("pooled") and averaged over responses that
           have both kinds of token ("mean_per_response").
Statistics the experiments report: Wilson interval, Pearson and Spearman correlations, and the
comparison of the two sides of the paper's §5 identity (`section54_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    x = np.asarray(x, np.float64).ravel()
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
    ranks = average_ranks(s)
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


# ------------------------------------------------------------------------------------------ statistics


def wilson_interval(successes: float, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default).

    `successes` may be fractional (ties counted as half a win); n must be > 0.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: successes must be in [0, n={n}], got {successes}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    # At k = 0 or k = n one end is exactly 0 or 1; say so rather than leave a rounding error.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.size != y.size or x.size < 2:
        raise ValueError(f"pearson: need two equal-length arrays of >= 2 values, got {x.size} and {y.size}")
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


def section54_summary(
    exact_BT: np.ndarray, sampled_reward_BT: np.ndarray, mask_BT: np.ndarray
) -> dict[str, float]:
    """Compare the two sides of the paper's §5 over the states visited by reference samples.

    exact_BT: E_{a~π_ref}[β log π/π_ref] computed over the whole vocabulary at each state
    (= −β KL, from tokenq.expected_ref_reward). sampled_reward_BT: β log π/π_ref of the token the
    reference actually sampled there (a one-sample Monte-Carlo estimate of the same expectation).
    Returns per-token means, the MC standard error, and the largest exact value (must be <= 0).
    """
    m = np.asarray(mask_BT, bool)
    if not m.any():
        raise ValueError("section54_summary: mask has no real tokens")
    exact = np.asarray(exact_BT, np.float64)[m]
    mc = np.asarray(sampled_reward_BT, np.float64)[m]
    diff = mc - exact  # zero-mean per state if the identity holds; its SE measures the MC noise
    return {
        "tokens": int(m.sum()),
        "exact_mean": float(exact.mean()),
        "exact_max": float(exact.max()),
        "mc_mean": float(mc.mean()),
        "mc_se": float(mc.std(ddof=1) / math.sqrt(mc.size)) if mc.size > 1 else float("nan"),
        "diff_mean": float(diff.mean()),
        "diff_se": float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else float("nan"),
        "per_response_exact": float((np.asarray(exact_BT, np.float64) * m).sum(-1).mean()),
        "per_response_mc": float((np.asarray(sampled_reward_BT, np.float64) * m).sum(-1).mean()),
    }
