"""The `dpoq` command: parses the subcommand and hands the rest of argv to its module.

Each subcommand lives beside the code it drives, as a function `main(argv: list[str]) -> int`;
this file only dispatches, so that `dpoq --help` stays fast (no JAX import).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dpoq_jax.demo:main", "end-to-end demo on bundled synthetic data (CPU, offline)"),
    "train": ("dpoq_jax.train.commands:train_main", "SFT or DPO training from a config file"),
    "precompute-ref": (
        "dpoq_jax.train.commands:precompute_ref_main",
        "store reference log-probs with the data",
    ),
    "convert": ("dpoq_jax.models.commands:convert_main", "Hugging Face directory <-> orbax checkpoint"),
    "generate": ("dpoq_jax.decode.commands:generate_main", "sample / beam / reward-guided search"),
    "compile": ("dpoq_jax.train.aot:compile_main", "compile the train step ahead of time for a TPU topology"),
    "score": ("dpoq_jax.analysis.commands:score_main", "per-token implicit rewards and HTML/PNG reports"),
}


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


def _usage() -> str:
    lines = ["usage: dpoq <command> [args...]", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`dpoq <command> --help` shows a command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from dpoq_jax import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dpoq: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _ = COMMANDS[name]
    module_name, func_name = target.split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        print(f"dpoq: command {name!r} is not available in this build ({e})", file=sys.stderr)
        return 2
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
