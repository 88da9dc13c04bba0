"""The argument parser every `dpoq` command and experiment uses: defaults in --help, one-line usage errors."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every subcommand's --help: the description as written, and after each option's meaning its
    default ("(default: X)"), or "(required)"; a help text that already says what the default means
    ("None: ...") or that the option is required keeps its words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is argparse.SUPPRESS or any(w in text for w in ("default:", "None:", "required")):
            return text
        if action.required:
            return f"{text} (required)"
        if action.option_strings:
            return f"{text} (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """A subcommand's parser: the HelpFormatter, and a usage error as one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")
