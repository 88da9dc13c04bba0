"""Anthropic HH-style pairs: {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}.

The prompt is the common prefix of the two dialogues up to and including the last "\n\nAssistant:"
inside it; the responses are what follows (usually " ..." with a leading space). When the dialogues
differ before their last assistant turn, the responses hold the remaining turns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import PreferenceExample
from dpoq_jax.data.jsonl import check_fields, check_pair, iter_json_lines

ASSISTANT = "\n\nAssistant:"


def split_dialogues(chosen: str, rejected: str, *, file: str | None = None,
                    line: int | None = None) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) of two HH dialogues."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last turn marker lying wholly in the common prefix
    if cut < 0:
        raise DataError(f"no common {ASSISTANT!r} turn before the dialogues differ",
                        kind="no_assistant_turn", file=file, line=line, key="chosen")
    end = cut + len(ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def hh_examples(
    rows: Iterable[tuple[int, object]], file: str, policy: ErrorPolicy
) -> list[PreferenceExample]:
    out = []
    for lineno, obj in rows:
        try:
            f = check_fields(obj, ("chosen", "rejected"), ("chosen", "rejected"), file=file, line=lineno)
            prompt, c, r = split_dialogues(f["chosen"], f["rejected"], file=file, line=lineno)
            for key, resp in (("chosen", c), ("rejected", r)):
                if not resp.strip():
                    raise DataError("empty response after the last assistant turn", kind="empty_response",
                                    file=file, line=lineno, key=key)
            check_pair(prompt, c, r, file=file, line=lineno)
        except DataError as e:
            policy.handle(e)
            continue
        out.append(PreferenceExample(prompt, c, r, {"source": file, "line": lineno}))
        policy.n_ok += 1
    return out


def read_hh_jsonl(path: str | os.PathLike, policy: ErrorPolicy | None = None) -> list[PreferenceExample]:
    """Reads an HH-style JSON-lines file (e.g. the unpacked train.jsonl of helpful-base)."""
    policy = policy or ErrorPolicy("fail")
    return hh_examples(iter_json_lines(path, policy), str(path), policy)
