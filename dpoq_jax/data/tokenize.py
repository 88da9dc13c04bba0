"""Tokenization of pairs and SFT examples so that the prompt's ids are a prefix of each sequence.

Prompt and response are encoded separately (no special tokens) and concatenated; EOS is appended to
each response. A BPE tokenizer may tokenize the joined text differently at the boundary (e.g. when
the prompt ends in a space and the response starts with a word); we keep the separate encoding, since
the prompt must be shared, and count such pairs in `TokenizeStats.boundary_mismatches` (the model
then sees a tokenization of the same text that it would rarely produce itself).

Truncation, limits in tokens: the prompt keeps its END (the last `max_prompt_tokens`, after the BOS
that `add_bos` puts first and that truncation keeps), a response
keeps its START (the first `max_response_tokens - 1` tokens, then EOS, so EOS counts in the limit).
With `truncate_prompt=False` (or `truncate_responses=False`) an over-long example is a DataError
(kind "prompt_too_long" / "response_too_long") that the ErrorPolicy fails on or skips.

Conversational examples (prompt and responses are lists of messages, data/chat.py) are rendered with the
tokenizer's chat template as TRL 1.16 does: no BOS or EOS is added (the template writes its own special
tokens and end-of-turn), the same truncation limits apply (a response cut short loses its end-of-turn),
and `chat_divergence` says what a template whose prompt is not a prefix of the conversation does
("warn" once, or "error": a DataError of kind "template_divergence").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

from dpoq_jax.data import chat
from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import (
    OutcomeExample,
    PreferenceExample,
    SFTExample,
    TokenizedOutcome,
    TokenizedPair,
    TokenizedSFT,
)


class Tokenizer(Protocol):
    eos_token_id: int
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    max_prompt_tokens: int = 512
    max_response_tokens: int = 128  # EOS included
    truncate_prompt: bool = True
    truncate_responses: bool = True
    add_bos: bool = False  # prepend tokenizer.bos_token_id to the prompt
    add_eos: bool = True
    check_boundary: bool = True  # also encode prompt + response jointly and count mismatches
    chat_divergence: str = "warn"  # conversational data: "warn" (once) or "error" (data/chat.py)


@dataclasses.dataclass
class TokenizeStats:
    n: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    boundary_mismatches: int = 0
    chat_divergences: int = 0  # conversational examples whose rendered prompt is not a prefix

    def summary(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _where(meta: dict[str, Any]) -> dict[str, Any]:
    return {"file": meta.get("source"), "line": meta.get("line")}


def _prompt_ids(
    tok: Tokenizer, raw_ids: list[int], cfg: TokenizeConfig, meta: dict, stats: TokenizeStats
) -> list[int]:
    head: list[int] = []
    if cfg.add_bos:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
        head = [bos]
    ids, limit = raw_ids, cfg.max_prompt_tokens - len(head)
    if len(ids) > limit:
        if not cfg.truncate_prompt:
            raise DataError(f"prompt has {len(head) + len(ids)} tokens > max_prompt_tokens="
                            f"{cfg.max_prompt_tokens}", kind="prompt_too_long", key="prompt", **_where(meta))
        ids = ids[len(ids) - limit :] if limit > 0 else []  # keep the end: the part next to the response
        stats.prompt_truncated += 1
    ids = head + ids
    if not ids:
        raise DataError("prompt has no tokens (set add_bos or give a prompt)", kind="empty_prompt",
                        key="prompt", **_where(meta))
    return ids


def _response_ids(tok: Tokenizer, prompt: str, raw_prompt_ids: list[int], text: str, key: str,
                  cfg: TokenizeConfig, meta: dict, stats: TokenizeStats) -> tuple[list[int], bool]:
    ids = encode(tok, text)
    # does joint tokenization of the text agree with prompt ids + response ids? (before truncation)
    mismatch = cfg.check_boundary and encode(tok, prompt + text) != raw_prompt_ids + ids
    if not ids:
        raise DataError("response has no tokens", kind="empty_response", key=key, **_where(meta))
    return _fit_response(tok, ids, key, cfg, meta, stats, cfg.add_eos), mismatch


def _fit_response(tok: Tokenizer, ids: list[int], key: str, cfg: TokenizeConfig, meta: dict,
                  stats: TokenizeStats, add_eos: bool) -> list[int]:
    limit = cfg.max_response_tokens - (1 if add_eos else 0)
    if len(ids) > limit:
        if not cfg.truncate_responses:
            raise DataError(f"response has {len(ids)} tokens > {limit} (max_response_tokens="
                            f"{cfg.max_response_tokens} incl. EOS)", kind="response_too_long", key=key,
                            **_where(meta))
        ids = ids[:limit]  # keep the start
        stats.response_truncated += 1
    if add_eos:
        ids = ids + [tok.eos_token_id]
    return ids


def _chat_ids(ex: PreferenceExample | SFTExample, keys: tuple[str, ...], tok: Tokenizer, cfg: TokenizeConfig,
              stats: TokenizeStats) -> tuple[list[int], list[list[int]], bool]:
    """Prompt and response ids of a conversational example (chat template), truncated like text."""
    where = _where(ex.meta)
    p_raw, responses, diverged = chat.tokenize_chat(
        tok, ex.prompt, [(k, getattr(ex, k)) for k in keys], divergence=cfg.chat_divergence, **where)
    stats.chat_divergences += int(diverged)
    p = _prompt_ids(tok, p_raw, dataclasses.replace(cfg, add_bos=False), ex.meta, stats)
    rs = [_fit_response(tok, ids, k, cfg, ex.meta, stats, add_eos=False)
          for k, ids in zip(keys, responses, strict=True)]
    return p, rs, diverged


def tokenize_pair(ex: PreferenceExample, tok: Tokenizer, cfg: TokenizeConfig,
                  stats: TokenizeStats | None = None) -> TokenizedPair:
    stats = stats if stats is not None else TokenizeStats()
    if chat.is_chat_example(ex):
        p, (c, r), _ = _chat_ids(ex, ("chosen", "rejected"), tok, cfg, stats)
        mc = mr = False  # one rendering of the whole conversation: no boundary to mismatch
    else:
        raw = encode(tok, ex.prompt)
        p = _prompt_ids(tok, raw, cfg, ex.meta, stats)
        c, mc = _response_ids(tok, ex.prompt, raw, ex.chosen, "chosen", cfg, ex.meta, stats)
        r, mr = _response_ids(tok, ex.prompt, raw, ex.rejected, "rejected", cfg, ex.meta, stats)
    if c == r:
        raise DataError("chosen and rejected have identical tokens", kind="identical_responses",
                        key="rejected", **_where(ex.meta))
    stats.n += 1
    meta = dict(ex.meta)
    if mc or mr:
        stats.boundary_mismatches += 1
        meta["boundary_mismatch"] = True
    return TokenizedPair(p, c, r, meta)


def tokenize_sft(ex: SFTExample, tok: Tokenizer, cfg: TokenizeConfig,
                 stats: TokenizeStats | None = None) -> TokenizedSFT:
    stats = stats if stats is not None else TokenizeStats()
    if chat.is_chat_example(ex):
        p, (c,), _ = _chat_ids(ex, ("completion",), tok, cfg, stats)
        m = False
    else:
        raw = encode(tok, ex.prompt)
        p = _prompt_ids(tok, raw, cfg, ex.meta, stats)
        c, m = _response_ids(tok, ex.prompt, raw, ex.completion, "completion", cfg, ex.meta, stats)
    stats.n += 1
    meta = dict(ex.meta)
    if m:
        stats.boundary_mismatches += 1
        meta["boundary_mismatch"] = True
    if isinstance(ex, OutcomeExample):  # a labelled response (unpaired losses)
        return TokenizedOutcome(p, c, meta, label=ex.label)
    return TokenizedSFT(p, c, meta)


def tokenize_all(examples: Sequence[PreferenceExample | SFTExample], tok: Tokenizer, cfg: TokenizeConfig,
                 policy: ErrorPolicy | None = None) -> tuple[list, TokenizeStats]:
    """Tokenizes a list; DataErrors (too long, empty, identical) go to the policy, whose `kept` count
    becomes the number of examples returned (the ones used)."""
    policy = policy or ErrorPolicy("fail")
    stats, out = TokenizeStats(), []
    for ex in examples:
        try:
            if isinstance(ex, PreferenceExample):
                out.append(tokenize_pair(ex, tok, cfg, stats))
            else:
                out.append(tokenize_sft(ex, tok, cfg, stats))
        except DataError as e:
            policy.handle(e)
    policy.n_ok = len(out)
    return out, stats
