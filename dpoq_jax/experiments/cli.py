"""Command-line glue shared by the experiments: options, config overrides, report files."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dpoq_jax.analysis.document import Report, command_line, log, machine_info
from dpoq_jax.train.runs import default_config, synthetic_overrides


def experiment_parser(
    name: str,
    doc: str,
    task: str,
    results_dir: Path | str,
    parents: Sequence[argparse.ArgumentParser] = (),
) -> argparse.ArgumentParser:
    """The options every experiment takes; its runs go to runs/experiments/<task>, shared by the
    experiments on the same task, so a finished run with the same settings (e.g. the SFT reference)
    is trained once."""
    from dpoq_jax.cli import Parser  # one-line usage errors, defaults in --help, as every dpoq command

    parser = Parser(
        prog=f"python -m experiments.{name}", description=doc.split("\n\n")[0], parents=list(parents)
    )
    parser.add_argument("--quick", action="store_true", help="small smoke-test version (minutes)")
    parser.add_argument(
        "--config",
        default=default_config(task),
        help="training configs: PREFIX[:arg] (PREFIX_sft.py, PREFIX_dpo.py) or FILE.py taking the stage; "
        "default: the packaged tiny configs of the task",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data, initialisation and sampling")
    parser.add_argument("--workdir", default=f"runs/experiments/{task}", help="where the training runs go")
    parser.add_argument(
        "--results", default=str(Path(results_dir) / f"{name}.md"), help="results Markdown file"
    )
    return parser


def check_overrides(rest: Sequence[str], parser: Any) -> list[str]:
    """Unknown arguments must be config overrides (--config.key=value), passed to every training run;
    anything else is a usage error naming the argument."""
    from dpoq_jax.train.config import ConfigError, parse_overrides

    try:
        parse_overrides(rest)
    except ConfigError as e:
        parser.error(str(e))
    return list(rest)


def parse_experiment_args(
    parser: argparse.ArgumentParser, argv: Sequence[str], name: str, task: str
) -> argparse.Namespace:
    """Parse argv; adds args.overrides (the task's needed settings, then the user's config overrides)
    and args.command (the command line that reproduces the run)."""
    args, rest = parser.parse_known_args(list(argv))
    args.overrides = synthetic_overrides(task, args.config) + check_overrides(rest, parser)
    args.command = command_line(f"python -m experiments.{name}", argv)
    return args


def run_meta(args: argparse.Namespace) -> dict[str, str]:
    """The "Run" table of an experiment's report: how to reproduce it, and where it ran."""
    return {"command": args.command, "seed": str(args.seed), "config": args.config, **machine_info()}


def write_report(name: str, report: Report, md_path: Path | str) -> int:
    """Write an experiment's results (Markdown and figures) and say where; the script's exit code."""
    paths = report.write(md_path)
    log(f"{name}: wrote {', '.join(str(p) for p in paths)}")
    return 0
