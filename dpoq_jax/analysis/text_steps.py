"""Steps of a response's text, mapped to its tokens, and their implicit process rewards (dpoq_jax/prm.py).

A step spec (`--steps SPEC`) is "newline" (a run of newlines ends a step), `re:PATTERN` (each non-empty
match of the regular expression ends a step) or any other string, a literal delimiter. The text cut at
the end of each match gives the text steps (a delimiter belongs to the step it ends). Tokens are mapped
to them through each token's character span in the decoded response: the span of token j ends at the
length of the longest common prefix of decode(ids[:j+1]) and decode(ids) (so a token that holds only
part of a multi-byte character ends where the character starts, and the token that completes it
takes it). **A token that straddles a boundary belongs to the step where it ends**; a text step in
which no token ends is merged into the next one, so every step holds at least one token.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpoq_jax import prm as core
from dpoq_jax.analysis.credit import TokenScores

NEWLINE = "newline"


def parse_spec(spec: str) -> re.Pattern[str]:
    """The step spec as a compiled pattern; a bad regular expression is a ValueError naming it."""
    if spec == NEWLINE:
        return re.compile(r"\n+")
    if spec.startswith("re:"):
        try:
            return re.compile(spec[3:])
        except re.error as e:
            raise ValueError(f"--steps {spec!r}: not a regular expression ({e})") from None
    if not spec:
        raise ValueError("--steps: an empty delimiter")
    return re.compile(re.escape(spec))


def text_cuts(text: str, pattern: re.Pattern[str]) -> list[int]:
    """Character offsets where a step ends (the end of each non-empty match, the text's end excluded)."""
    return sorted({m.end() for m in pattern.finditer(text) if m.end() > m.start() and m.end() < len(text)})


def token_ends(tok: Any, ids: Sequence[int]) -> tuple[str, list[int]]:
    """(decoded text, end offset of each token's character span in it), non-decreasing."""
    text = tok.decode(list(ids))
    ends, last = [], 0
    for j in range(len(ids)):
        prefix = tok.decode(list(ids[: j + 1]))
        n = len(os.path.commonprefix([prefix, text]))
        last = max(last, n)
        ends.append(last)
    return text, ends


@dataclasses.dataclass
class Segmentation:
    """Steps of one response: `step_ids` (one per token), token `ranges` [start, stop) and texts."""

    text: str
    step_ids: list[int]
    ranges: list[tuple[int, int]]
    texts: list[str]
    cut: bool  # whether the pattern ended any step inside the text


def assign_steps(ends: Sequence[int], cuts: Sequence[int]) -> list[int]:
    """Step of each token from its span's end offset: the number of cuts before its last character
    (a token of an empty span goes with the character before it), renumbered densely 0, 1, ..."""
    raw = [int(np.searchsorted(cuts, max(e - 1, 0), side="right")) for e in ends]
    dense, out = {}, []
    for s in raw:
        out.append(dense.setdefault(s, len(dense)))
    return out


def segment(tok: Any, ids: Sequence[int], pattern: re.Pattern[str]) -> Segmentation:
    text, ends = token_ends(tok, ids)
    cuts = text_cuts(text, pattern)
    step_ids = assign_steps(ends, cuts)
    ranges, texts = [], []
    for k in range(step_ids[-1] + 1 if step_ids else 0):
        a, b = step_ids.index(k), len(step_ids) - step_ids[::-1].index(k)
        ranges.append((a, b))
        texts.append(text[(ends[a - 1] if a else 0) : ends[b - 1]])
    return Segmentation(text, step_ids, ranges, texts, bool(cuts))


def check_cut(segs: Sequence[Segmentation], spec: str, where: str) -> None:
    """An explicitly given spec that ends no step in any response is most likely a wrong one: an error
    naming the input (`where`, e.g. file:line or file:first-last)."""
    if segs and not any(s.cut for s in segs):
        raise ValueError(
            f"{where}: --steps {spec!r} matches nothing inside any of the {len(segs)} responses "
            "(each would be one step)"
        )


def step_values(scores: Sequence[TokenScores], segs: Sequence[Segmentation]) -> list[dict[str, Any]]:
    """Per response: step ranges, texts, rewards and every aggregation (min, sum, last, mean)."""
    if not scores:
        return []
    B, T = len(scores), max(len(s.ids) for s in scores)
    K = max(len(g.ranges) for g in segs)
    rewards_BT = np.zeros((B, T), np.float32)
    ids_BT = np.full((B, T), -1, np.int32)
    for b, (s, g) in enumerate(zip(scores, segs, strict=True)):
        rewards_BT[b, : len(s.ids)] = s.rewards
        ids_BT[b, : len(s.ids)] = g.step_ids
    r_BK, m_BK = core.step_rewards(rewards_BT, ids_BT, K)
    agg = {how: np.asarray(core.aggregate(r_BK, m_BK, how)) for how in core.AGGREGATES}
    r_BK = np.asarray(r_BK)
    return [
        {
            "ranges": [list(r) for r in g.ranges],
            "texts": list(g.texts),
            "rewards": [float(x) for x in r_BK[b, : len(g.ranges)]],
            **{how: float(agg[how][b]) for how in core.AGGREGATES},
        }
        for b, g in enumerate(segs)
    ]
