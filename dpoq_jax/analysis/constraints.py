"""Verifiable constraints on a response's text, their exact violating characters, and the tokens that
hold them (issue #23; pure Python, no JAX).

A constraint has an instruction (added to the prompt), and `violations(text)`: the character spans
[start, stop) of the text that break it, sorted and disjoint; the text keeps the constraint iff there
are none. The constraints:

  * no_e: no letter "e" — every "e" and "E" is a violation (accented letters such as "é" are other
    letters and allowed);
  * no_comma: no "," (other punctuation allowed);
  * lowercase: lowercase only — every character with `str.isupper()` (any script) is a violation;
  * no_digits: no digits — every character with `str.isdigit()` (so "²" too);
  * no_word:<w>: without the word w — every whole-word, case-insensitive occurrence of w (word
    boundaries as in the `re` module's Unicode \\b, so "the" is found in "The," and "the's" but not in
    "there" or "breathe"); the violation is the word's characters;
  * max_words:<N>: at most N words — a word is a maximal run of non-whitespace characters (`str.split`),
    so "well-known," is one word; the violations are the characters of words N+1, N+2, ... (each word's
    own span, not the whitespace between them).

`token_violations` maps the character spans to response tokens: each token's character span in the
decoded response is found by decoding the response cumulatively (analysis.text_steps.token_ends: the span of
token j ends where decode(ids[:j+1]) stops agreeing with decode(ids); it starts where token j−1's ends).
A token violates iff its span overlaps a violating span, so a token that straddles a boundary (" the"
with its space, "a,b") violates when any of its characters does; a token holding only part of a
multi-byte character has an empty span and never violates (the token that completes the character
takes it). Template tokens are not content and never violate: a special token of the tokenizer (e.g.
"<|im_end|>") and every token whose span lies outside the message content's characters (the newline the
chat template writes after "<|im_end|>"; the content is found at its first occurrence in the decoded
response, since a template may render a character before it).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: `name` (e.g. "no_word:the"), the instruction a prompt adds, and the
    violating character spans of a text."""

    name: str
    instruction: str

    def violations(self, text: str) -> list[Span]:
        kind, _, arg = self.name.partition(":")
        if kind == "no_e":
            return _chars(text, lambda c: c in "eE")
        if kind == "no_comma":
            return _chars(text, lambda c: c == ",")
        if kind == "lowercase":
            return _chars(text, str.isupper)
        if kind == "no_digits":
            return _chars(text, str.isdigit)
        if kind == "no_word":
            pattern = re.compile(rf"\b{re.escape(arg)}\b", re.IGNORECASE)
            return [m.span() for m in pattern.finditer(text)]
        if kind == "max_words":
            return [m.span() for m in re.finditer(r"\S+", text)][int(arg) :]
        raise ValueError(f"unknown constraint {self.name!r}")

    def check(self, text: str) -> bool:
        """True iff the text keeps the constraint."""
        return not self.violations(text)


def _chars(text: str, bad: Any) -> list[Span]:
    return [(i, i + 1) for i, c in enumerate(text) if bad(c)]


def constraint(name: str) -> Constraint:
    """The constraint named `name`: no_e, no_comma, lowercase, no_digits, no_word:<word>,
    max_words:<N>; anything else is a ValueError naming the choices."""
    kind, _, arg = name.partition(":")
    fixed = {
        "no_e": 'Do not use the letter "e" anywhere in your answer.',
        "no_comma": "Do not use any commas in your answer.",
        "lowercase": "Write your answer in lowercase letters only, with no capital letters.",
        "no_digits": "Do not use any digits in your answer; write numbers as words.",
    }
    if kind in fixed and not arg:
        return Constraint(name, fixed[kind])
    if kind == "no_word" and re.fullmatch(r"\w+", arg or ""):
        return Constraint(name, f'Do not use the word "{arg}" in your answer.')
    if kind == "max_words" and arg.isdigit() and int(arg) > 0:
        return Constraint(name, f"Answer in at most {int(arg)} words.")
    raise ValueError(
        f"constraint {name!r}: expected one of no_e, no_comma, lowercase, no_digits, no_word:<word>, "
        "max_words:<N> (N ≥ 1)"
    )


def overlaps(span: Span, spans: Sequence[Span]) -> bool:
    """Whether [a, b) shares a character with any of `spans` (an empty span shares none)."""
    a, b = span
    return any(s < b and a < e for s, e in spans)


def token_spans(tok: Any, ids: Sequence[int]) -> tuple[str, list[Span]]:
    """(decoded text, character span [start, stop) of each token in it), by cumulative decoding."""
    from dpoq_jax.analysis.text_steps import token_ends

    text, ends = token_ends(tok, ids)
    return text, [(ends[j - 1] if j else 0, e) for j, e in enumerate(ends)]


def content_tokens(tok: Any, ids: Sequence[int], content: str) -> tuple[int, list[int]]:
    """(offset of `content` in the decoded response, indices of the content tokens). The content is
    found at its first occurrence in decode(ids) (a chat template may render a character before it, e.g.
    the newline of the prompt when the tokens merge); a content token is not a special token and its
    span overlaps the content's characters. Content that is not in the decoded text is a ValueError."""
    text, spans = token_spans(tok, ids)
    start = text.find(content)
    if start < 0 or not content:
        raise ValueError(
            f"the decoded response {text[:60]!r} does not contain its message content {content[:60]!r}"
        )
    special = {int(i) for i in getattr(tok, "all_special_ids", ())}
    stop = start + len(content)
    pairs = zip(ids, spans, strict=True)
    keep = [j for j, (t, s) in enumerate(pairs) if int(t) not in special and s[0] < stop and start < s[1]]
    return start, keep


def token_violations(tok: Any, ids: Sequence[int], content: str, spans: Sequence[Span]) -> list[int]:
    """Indices of the response tokens `ids` that hold a violating character of `content` (the message
    text; `spans` are its violating character spans, in content coordinates): content tokens
    (`content_tokens`) whose span overlaps a violating span. Template tokens never violate."""
    start, keep = content_tokens(tok, ids, content)
    _, tspans = token_spans(tok, ids)
    moved = [(a + start, b + start) for a, b in spans]
    return [j for j in keep if overlaps(tspans[j], moved)]
