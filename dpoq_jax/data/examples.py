"""Plain example types shared by every data source (CONTRACTS.md §4)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class PreferenceExample:
    """One preference pair as text: the chosen and rejected responses follow `prompt` directly."""

    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SFTExample:
    """One supervised example: `completion` follows `prompt` directly."""

    prompt: str
    completion: str
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
