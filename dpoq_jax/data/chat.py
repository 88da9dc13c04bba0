"""Chat-format (conversational) data: TRL's formats, validated, and tokenised with the chat template.

Rows (one JSON line, or one row of a Hugging Face `datasets` table), as TRL names them:
  preference, explicit prompt: {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs]}
  preference, implicit prompt: {"chosen": [whole conversation], "rejected": [whole conversation]};
      the prompt is their longest common prefix of messages (TRL's `extract_prompt`)
  SFT: {"prompt": [msgs], "completion": [msgs]} or {"messages": [whole conversation]}; the prompt of a
      `messages` row is every message before the last one, which must be the assistant's
A message is {"role": "system" | "developer" | "user" | "assistant" | "tool", "content": str}; other keys
(e.g. tool calls) go to the template untouched. Standard rows (strings) stay with data/jsonl.py.

Tokenisation follows TRL 1.16's DPOTrainer: prompt ids = the prompt rendered with the generation prompt;
full ids = prompt + response rendered as one conversation; the response starts where the two diverge
(normally at the end of the prompt ids). Both renderings come from the tokenizer's own
`apply_chat_template` (tokens of the rendered text, no further special tokens). The response therefore
ends with what the template writes after the last message (its end-of-turn token(s), e.g. ChatML's
"<|im_end|>\\n"); no EOS is added. Where the prompt is not a prefix of the conversation (a template that
renders the generation prompt differently), the end of the prompt is left out, as TRL does: a warning
says so once, or with `divergence="error"` the example is a DataError (kind "template_divergence").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from dpoq_jax.data.errors import DataError

log = logging.getLogger(__name__)

ROLES = ("system", "developer", "user", "assistant", "tool")
CHAT_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")
DIVERGENCE_CHOICES = ("warn", "error")

Messages = list[dict[str, Any]]

_warned = False  # the divergence warning is shown once per process, like TRL's warning_once


def is_conversational(row: Any) -> bool:
    """Does a row hold messages (a list) under one of TRL's keys? (Strings: the standard format.)"""
    return isinstance(row, Mapping) and any(isinstance(row.get(k), list) for k in CHAT_KEYS)


def is_chat_example(ex: Any) -> bool:
    """A PreferenceExample / SFTExample whose prompt is a list of messages."""
    return isinstance(getattr(ex, "prompt", None), list)


def check_messages(value: Any, *, file: str | None, line: int | None, key: str, allow_empty: bool = False
                   ) -> Messages:
    """`value` as a list of messages; a bad one is a DataError naming file, line, key and message index."""
    if not isinstance(value, list):
        raise DataError(f"expected a list of messages, got {type(value).__name__}", kind="not_messages",
                        file=file, line=line, key=key)
    if not value and not allow_empty:
        raise DataError("no messages", kind="empty_messages", file=file, line=line, key=key)
    out = []
    for i, m in enumerate(value):
        where = f"message {i}: "
        if not isinstance(m, Mapping):
            raise DataError(f"{where}expected an object with 'role' and 'content', got {type(m).__name__}",
                            kind="bad_message", file=file, line=line, key=key)
        for field in ("role", "content"):
            if field not in m or m[field] is None:
                raise DataError(f"{where}no {field!r}", kind="bad_message", file=file, line=line, key=key)
        if not isinstance(m["content"], str):
            raise DataError(f"{where}'content' must be a string, got {type(m['content']).__name__}",
                            kind="bad_message", file=file, line=line, key=key)
        if m["role"] not in ROLES:
            raise DataError(f"{where}unknown role {m['role']!r} (expected one of {', '.join(ROLES)})",
                            kind="unknown_role", file=file, line=line, key=key)
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}lone surrogate at character {e.start} (not valid Unicode text)",
                            kind="invalid_unicode", file=file, line=line, key=key) from None
        # datasets tables fill missing struct fields with None; the template must not see them
        out.append({k: v for k, v in m.items() if v is not None})
    return out


def _last_is_assistant(msgs: Messages, *, file: str | None, line: int | None, key: str) -> None:
    if not msgs or msgs[-1]["role"] != "assistant":
        last = msgs[-1]["role"] if msgs else "nothing"
        raise DataError(f"the conversation must end with the assistant's message, ends with {last!r}",
                        kind="last_not_assistant", file=file, line=line, key=key)


def common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    """Number of leading items `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def split_preference(row: Mapping[str, Any], *, file: str | None, line: int | None
                     ) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of a conversational preference row (explicit or implicit
    prompt); the DataErrors name the row."""
    kw = dict(file=file, line=line)
    for k in ("chosen", "rejected"):
        if k not in row:
            raise DataError("missing key", kind="missing_key", key=k, **kw)
    chosen = check_messages(row["chosen"], key="chosen", **kw)
    rejected = check_messages(row["rejected"], key="rejected", **kw)
    if row.get("prompt") is not None:
        prompt = check_messages(row["prompt"], key="prompt", **kw)
    else:  # implicit prompt: the messages both conversations start with
        n = common_prefix(chosen, rejected)
        if n == 0:
            raise DataError("chosen and rejected share no prompt (their first messages differ)",
                            kind="no_shared_prompt", key="rejected", **kw)
        if n == len(chosen) or n == len(rejected):
            raise DataError("no response after the shared prompt: one conversation is the start of the other",
                            kind="identical_responses", key="rejected", **kw)
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    for k, msgs in (("chosen", chosen), ("rejected", rejected)):
        _last_is_assistant(msgs, key=k, **kw)
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", kind="identical_responses", key="rejected", **kw)
    return prompt, chosen, rejected


def split_sft(row: Mapping[str, Any], *, file: str | None, line: int | None) -> tuple[Messages, Messages]:
    """(prompt, completion) messages of a conversational SFT row ({"messages"} or prompt/completion)."""
    kw = dict(file=file, line=line)
    if "messages" in row:
        msgs = check_messages(row["messages"], key="messages", **kw)
        _last_is_assistant(msgs, key="messages", **kw)
        return msgs[:-1], msgs[-1:]
    for k in ("prompt", "completion"):
        if k not in row:
            raise DataError("missing key", kind="missing_key", key=k, **kw)
    prompt = check_messages(row["prompt"], key="prompt", allow_empty=True, **kw)
    completion = check_messages(row["completion"], key="completion", **kw)
    _last_is_assistant(completion, key="completion", **kw)
    return prompt, completion


def check_template(tok: Any) -> None:
    """A tokenizer without a chat template cannot read conversational data: say so (a setup error)."""
    if not getattr(tok, "chat_template", None):
        name = getattr(tok, "name_or_path", "") or type(tok).__name__
        raise ValueError(f"tokenizer {name}: conversational data needs a chat template, and this tokenizer "
                         "has none (chat_template.jinja, or chat_template in tokenizer_config.json)")


def render_ids(tok: Any, messages: Messages, *, add_generation_prompt: bool = False,
               file: str | None = None, line: int | None = None, key: str | None = None) -> list[int]:
    """Token ids of `messages` under the tokenizer's chat template (as TRL's `_tokenize` asks for them);
    a template that raises is a DataError naming the row."""
    check_template(tok)
    try:
        out = tok.apply_chat_template(messages, tokenize=True, return_dict=True,
                                      add_generation_prompt=add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - jinja raises its own TemplateError (or anything a template does)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"the chat template raised {type(e).__name__}: {msg}", kind="template_error",
                        file=file, line=line, key=key) from None
    return [int(i) for i in out["input_ids"]]


def render_prompt_text(tok: Any, messages: Messages, *, where: str = "") -> str:
    """The prompt as text, with the generation prompt (what a chat model is asked to continue)."""
    check_template(tok)
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{where}: the chat template raised {type(e).__name__}: {e}") from None


def _diverged(tok: Any, prompt_ids: list[int], n: int, divergence: str, file: str | None, line: int | None
              ) -> None:
    global _warned
    tail = tok.decode(prompt_ids[n:])
    msg = (f"the rendered prompt is not a prefix of the rendered conversation: the response starts where "
           f"they diverge and {tail!r} (the end of the prompt) is left out of the sequence")
    if divergence == "error":
        raise DataError(msg + " (data.chat_divergence='error')", kind="template_divergence", file=file,
                        line=line)
    if not _warned:
        _warned = True
        where = f"{file}:{line}: " if file is not None else ""
        log.warning("%s%s; shown once, it likely applies to every example (as TRL does; "
                    "data.chat_divergence='error' refuses such examples)", where, msg)


def tokenize_chat(tok: Any, prompt: Messages, responses: Sequence[tuple[str, Messages]], *,
                  divergence: str = "warn", file: str | None = None, line: int | None = None
                  ) -> tuple[list[int], list[list[int]], bool]:
    """(prompt ids, ids of each response, diverged) as TRL 1.16's DPOTrainer tokenises a conversational
    example: the prompt is the common prefix of the rendered prompt (generation prompt added) and of
    every rendered prompt + response conversation."""
    if divergence not in DIVERGENCE_CHOICES:
        raise ValueError(f"chat divergence must be one of {DIVERGENCE_CHOICES}, got {divergence!r}")
    kw = dict(file=file, line=line)
    prompt_ids = render_ids(tok, prompt, add_generation_prompt=True, key="prompt", **kw)
    full = [render_ids(tok, prompt + msgs, key=k, **kw) for k, msgs in responses]
    n = min(common_prefix(prompt_ids, f) for f in full)
    diverged = n < len(prompt_ids)
    if diverged:
        _diverged(tok, prompt_ids, n, divergence, file, line)
    out = [f[n:] for f in full]
    for (k, _), ids in zip(responses, out, strict=True):
        if not ids:
            raise DataError("empty response after the chat template", kind="empty_response", key=k, **kw)
    return prompt_ids[:n], out, diverged
