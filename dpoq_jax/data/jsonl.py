"""JSON Lines sources: {"prompt", "chosen", "rejected"} pairs, {"prompt", "completion"} SFT rows and
{"prompt", "completion", "label"} outcome rows (label true/false or a number in [0, 1]; TRL's KTO format).

Rows are either standard (strings, below) or conversational (lists of {"role", "content"} messages, TRL's
formats, implicit prompt and {"messages"} SFT rows included; see data/chat.py).

The full text of a response is prompt + response, joined as given (no separator is added), so a
response usually starts with a space or newline. Every bad line becomes a DataError naming the file,
line and key; the ErrorPolicy decides between failing and skipping (with counts). A UTF-8 byte-order
mark at the start of a file (written by some Windows tools) is accepted and ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from dpoq_jax import paths
from dpoq_jax.data import chat
from dpoq_jax.data.errors import DataError, ErrorPolicy
from dpoq_jax.data.examples import OutcomeExample, PreferenceExample, SFTExample


def iter_json_lines(path: str | os.PathLike, policy: ErrorPolicy) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line; unreadable lines go to the policy."""
    path = str(path)
    try:
        f = paths.open(path, "rb")  # bytes, so that invalid UTF-8 is reported per line; local or gs://
    except FileNotFoundError:
        policy.handle(DataError("file does not exist", kind="missing_file", file=path))
        return
    except OSError as e:
        policy.handle(DataError(f"cannot open: {e.strerror}", kind="unreadable_file", file=path))
        return
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                policy.handle(DataError(f"invalid UTF-8 at byte {e.start}", kind="invalid_utf8",
                                        file=path, line=lineno))
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]  # a byte-order mark: valid UTF-8, not part of the first record
            if not text.strip():
                continue
            try:
                obj = json.loads(text, object_pairs_hook=_unique_keys)
            except json.JSONDecodeError as e:
                policy.handle(DataError(f"malformed JSON: {e.msg} (column {e.colno})",
                                        kind="malformed_json", file=path, line=lineno))
                continue
            except _DuplicateKey as e:
                policy.handle(DataError("duplicated key: the record is ambiguous", kind="duplicate_key",
                                        file=path, line=lineno, key=e.key))
                continue
            yield lineno, obj


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object_pairs_hook: an object that names a key twice is refused (json.loads would keep
    the last value without a word)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def check_text(text: str, *, file: str, line: int | None, key: str) -> None:
    """A JSON string may hold a lone surrogate ("\\ud800"), which is no text: no tokenizer can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"lone surrogate {text[e.start]!r} at character {e.start} (not valid Unicode text)",
                        kind="invalid_unicode", file=file, line=line, key=key) from None


def first_record(path: str | os.PathLike) -> dict[str, Any] | None:
    """The first line of a file that is a JSON object (None if there is none), e.g. to tell an SFT
    file from a preference file; the real read that follows reports every bad line under its policy."""
    objs = (obj for _, obj in iter_json_lines(path, ErrorPolicy("skip")) if isinstance(obj, dict))
    return next(objs, None)


def check_fields(
    obj: Any, keys: Sequence[str], responses: Sequence[str], *, file: str, line: int | None
) -> dict[str, str]:
    """Validates that `obj` is an object with string `keys` and non-empty `responses`; returns them."""
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {type(obj).__name__}", kind="not_object",
                        file=file, line=line)
    out = {}
    for k in keys:
        if k not in obj:
            raise DataError("missing key", kind="missing_key", file=file, line=line, key=k)
        if not isinstance(obj[k], str):
            raise DataError(f"expected a string, got {type(obj[k]).__name__}", kind="not_string",
                            file=file, line=line, key=k)
        check_text(obj[k], file=file, line=line, key=k)
        out[k] = obj[k]
    for k in responses:
        if not out[k].strip():
            raise DataError("empty response", kind="empty_response", file=file, line=line, key=k)
    return out


def check_pair(prompt: str, chosen: str, rejected: str, *, file: str, line: int | None) -> None:
    if chosen == rejected:
        raise DataError("chosen and rejected are identical", kind="identical_responses",
                        file=file, line=line, key="rejected")


def preference_from_row(obj: Any, *, file: str, line: int | None) -> PreferenceExample:
    """One preference row, standard (strings) or conversational (messages; data/chat.py), as an example;
    a bad row is a DataError naming file, line and key. Other keys go to meta."""
    if chat.is_conversational(obj):
        prompt, chosen, rejected = chat.split_preference(obj, file=file, line=line)
        used: tuple[str, ...] = ("prompt", "chosen", "rejected")
    else:
        f = check_fields(obj, ("prompt", "chosen", "rejected"), ("chosen", "rejected"), file=file, line=line)
        check_pair(f["prompt"], f["chosen"], f["rejected"], file=file, line=line)
        prompt, chosen, rejected, used = f["prompt"], f["chosen"], f["rejected"], tuple(f)
    meta = {k: v for k, v in obj.items() if k not in used}
    meta.update(source=file, line=line)
    return PreferenceExample(prompt, chosen, rejected, meta)


def sft_from_row(obj: Any, *, file: str, line: int | None) -> SFTExample:
    """One SFT row: {"prompt", "completion"} strings, or conversational ({"messages"} or prompt/completion
    message lists)."""
    if chat.is_conversational(obj):
        prompt, completion = chat.split_sft(obj, file=file, line=line)
        used: tuple[str, ...] = ("prompt", "completion", "messages")
    else:
        f = check_fields(obj, ("prompt", "completion"), ("completion",), file=file, line=line)
        prompt, completion, used = f["prompt"], f["completion"], tuple(f)
    meta = {k: v for k, v in obj.items() if k not in used}
    meta.update(source=file, line=line)
    return SFTExample(prompt, completion, meta)


def outcome_from_row(obj: Any, *, file: str, line: int | None) -> OutcomeExample:
    """One outcome row: an SFT row (strings or messages) with a "label": true/false, or a number in
    [0, 1] (1 good, 0 bad)."""
    ex = sft_from_row(obj, file=file, line=line)
    if "label" not in obj:
        raise DataError("missing key", kind="missing_key", file=file, line=line, key="label")
    label = obj["label"]
    if isinstance(label, bool):
        label = float(label)
    elif not isinstance(label, int | float) or not 0.0 <= label <= 1.0:  # NaN fails the range too
        raise DataError(f"expected true/false or a number in [0, 1], got {label!r}", kind="bad_label",
                        file=file, line=line, key="label")
    meta = {k: v for k, v in ex.meta.items() if k != "label"}
    return OutcomeExample(ex.prompt, ex.completion, meta, label=float(label))


def read_jsonl(path: str | os.PathLike, from_row: Any, policy: ErrorPolicy | None = None) -> list:
    """Examples of every line through `from_row` (preference_from_row, sft_from_row, outcome_from_row);
    a bad line goes to the policy (default: fail) as a DataError naming file, line and key."""
    policy = policy or ErrorPolicy("fail")
    out = []
    for lineno, obj in iter_json_lines(path, policy):
        try:
            out.append(from_row(obj, file=str(path), line=lineno))
        except DataError as e:
            policy.handle(e)
            continue
        policy.n_ok += 1
    return out


def read_preference_jsonl(
    path: str | os.PathLike, policy: ErrorPolicy | None = None
) -> list[PreferenceExample]:
    """Reads {"prompt", "chosen", "rejected"} lines, strings or messages (other keys go to meta)."""
    return read_jsonl(path, preference_from_row, policy)


def read_sft_jsonl(path: str | os.PathLike, policy: ErrorPolicy | None = None) -> list[SFTExample]:
    """Reads {"prompt", "completion"} or {"messages"} lines (other keys go to meta)."""
    return read_jsonl(path, sft_from_row, policy)


def read_outcome_jsonl(path: str | os.PathLike, policy: ErrorPolicy | None = None) -> list[OutcomeExample]:
    """Reads {"prompt", "completion", "label"} lines (or {"messages", "label"}; other keys go to meta)."""
    return read_jsonl(path, outcome_from_row, policy)


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
    """Writes rows as UTF-8 JSON lines (for exporting synthetic data or fixtures)."""
    with paths.open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
