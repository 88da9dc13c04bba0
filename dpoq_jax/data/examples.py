"""Plain example types shared by every data source (CONTRACTS.md §4)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PreferenceExample:
    """One preference pair as text: the chosen and rejected responses follow `prompt` directly. In the
    chat format (data/chat.py) the three are lists of {"role", "content"} messages instead."""

    prompt: str | list[dict[str, Any]]
    chosen: str | list[dict[str, Any]]
    rejected: str | list[dict[str, Any]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SFTExample:
    """One supervised example: `completion` follows `prompt` directly (or, chat format, message lists)."""

    prompt: str | list[dict[str, Any]]
    completion: str | list[dict[str, Any]]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TokenizedPair:
    """Token ids of a pair; responses end with EOS. prompt_ids + chosen_ids is the chosen sequence."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TokenizedSFT:
    """Token ids of an SFT example; the completion ends with EOS."""

    prompt_ids: list[int]
    completion_ids: list[int]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class OutcomeExample(SFTExample):
    """One response with an outcome label (1 good, 0 bad; soft labels in between), for the unpaired
    losses (losses.UNPAIRED_TYPES); tokenised and laid out like an SFT example."""

    label: float = 1.0


@dataclasses.dataclass
class TokenizedOutcome(TokenizedSFT):
    """Token ids of an OutcomeExample and its label."""

    label: float = 1.0


def unpair(pairs: list[PreferenceExample]) -> list[OutcomeExample]:
    """Each pair as two labelled responses, the chosen one good (1) and the rejected one bad (0), as
    TRL's unpair_preference_dataset does; meta records which side each came from."""
    out = []
    for p in pairs:
        out.append(OutcomeExample(p.prompt, p.chosen, dict(p.meta, side="chosen"), label=1.0))
        out.append(OutcomeExample(p.prompt, p.rejected, dict(p.meta, side="rejected"), label=0.0))
    return out
