"""Bad-input handling: one error type that names file, line and key, and a fail/skip policy."""

from __future__ import annotations

import collections
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("fail", "skip")


class DataError(ValueError):
    """Bad input data. `kind` is a short stable tag (e.g. "malformed_json") used in skip counts."""

    def __init__(
        self,
        message: str,
        *,
        kind: str = "invalid",
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ):
        self.message, self.kind, self.file, self.line, self.key = message, kind, file, line, key
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.file is not None:
            where = str(self.file) + (f":{self.line}" if self.line is not None else "")
        key = f"key {self.key!r}: " if self.key is not None else ""
        return f"{where}: {key}{self.message}" if where else f"{key}{self.message}"


class ErrorPolicy:
    """Applies on_error="fail" (raise the DataError) or "skip" (count it and go on).

    `summary()` gives the counts per kind, reported by the loaders as one log line. `n_ok` ("kept")
    counts the examples that came out of the last stage the policy went through: reading, then
    tokenisation (`tokenize_all` sets it to the examples it returns), i.e. the examples used.
    """

    def __init__(self, on_error: str = "fail", *, max_examples: int = 5):
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.on_error = on_error
        self.counts: collections.Counter[str] = collections.Counter()
        self.examples: list[str] = []  # first few messages, to show the user what was skipped
        self.max_examples = max_examples
        self.n_ok = 0

    def handle(self, err: DataError) -> None:
        """Raise `err` under "fail"; otherwise record it."""
        if self.on_error == "fail":
            raise err
        self.counts[err.kind] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(err))

    @property
    def n_skipped(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"kept": self.n_ok, "skipped": self.n_skipped, "by_kind": dict(self.counts),
                "examples": list(self.examples)}

    def summary_line(self, what: str = "data") -> str:
        line = f"{what}: kept {self.n_ok}, skipped {self.n_skipped}"
        if self.counts:
            line += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) + ")"
        return line

    def log_summary(self, what: str = "data", level: int = logging.INFO) -> str:
        """Logs the counts (and the first skipped messages) once; returns the counts line."""
        line = self.summary_line(what)
        log.log(level, line)
        if self.examples:
            log.log(level, "first skipped: %s", " | ".join(self.examples))
        return line


# Errors that bad input (files, JSON lines, keys, config values) raises; DataError and ConfigError are
# ValueErrors, a missing or unreadable file an OSError.
USER_ERRORS = (ValueError, OSError)


def reports_user_errors(prog: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for a command's `main(argv) -> int`: a bad-input error ends it with one line on
    stderr ("PROG: error: message naming file/line/key") and exit status 1 instead of a traceback.
    DPOQ_TRACEBACK=1 in the environment re-raises, for debugging."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args: Any, **kwargs: Any) -> int:
            try:
                return main(*args, **kwargs)
            except USER_ERRORS as e:
                if os.environ.get("DPOQ_TRACEBACK"):
                    raise
                raise SystemExit(f"{prog}: error: {e}") from None

        return run

    return wrap
