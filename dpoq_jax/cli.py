"""The `dpoq` command: parses the subcommand and hands the rest of argv to its module.

Each subcommand is a module of dpoq_jax/commands/ with a function `NAME_main(argv: list[str]) -> int`
that parses its options (dpoq_jax/parser.py) and calls the library; this file only dispatches, so
that `dpoq --help` stays fast (no JAX import).
"""

from __future__ import annotations

import importlib
import sys

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("dpoq_jax.demo:main", "end-to-end demo on bundled synthetic data (CPU, offline)"),
    "train": ("dpoq_jax.commands.train:train_main", "SFT or DPO training from a config file"),
    "precompute-ref": (
        "dpoq_jax.commands.train:precompute_ref_main",
        "store reference log-probs with the data",
    ),
    "token-rewards": (
        "dpoq_jax.commands.train:token_rewards_main",
        "store an oracle's per-token rewards (token_weighted / selective DPO)",
    ),
    "convert": ("dpoq_jax.commands.convert:convert_main", "Hugging Face directory <-> orbax checkpoint"),
    "generate": ("dpoq_jax.commands.generate:generate_main", "sample / beam / reward-guided search"),
    "compile": (
        "dpoq_jax.commands.compile:compile_main",
        "compile the train step ahead of time for a TPU topology",
    ),
    "score": ("dpoq_jax.commands.score:score_main", "per-token implicit rewards and HTML/PNG reports"),
    "rerank": ("dpoq_jax.commands.rerank:rerank_main", "best-of-N by implicit process rewards or a vote"),
}


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
