"""Command-line glue shared by the experiments: options, seeds, config overrides, report files.

An experiment module defines NAME, TASK, `run(args, scale) -> Report` (one seed; its `numbers` feed
the verdicts) and `verdicts(numbers, scale) -> {section title: Verdict}` (from intervals over seeds);
optionally TASKS (a --task choice) and `add_args(parser)`. `experiment_main` serves them all.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from dpoq_jax.analysis import seeds as seeds_lib
from dpoq_jax.analysis.document import Report, Verdict, code_commit, command_line, log, machine_info
from dpoq_jax.experiments.runs import default_config

# where the reports go by default: the repository's experiments/results (run from a clone)
RESULTS_DIR = Path(__file__).resolve().parents[2] / "experiments" / "results"
DEFAULT_SEEDS = {"full": (0, 1, 2, 3, 4), "quick": (0, 1)}
# Options that do not change a seed's results (where they are written, how the call was typed).
VOLATILE = ("seeds", "seed", "workdir", "results", "command", "quick")


def seed_list(text: str) -> tuple[int, ...]:
    """ "0,1,2" or "0-4" -> seeds (argparse type)."""
    try:
        if "-" in text.strip("-"):
            lo, hi = text.split("-")
            out = tuple(range(int(lo), int(hi) + 1))
        else:
            out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds must look like 0,1,2 or 0-4, got {text!r}") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise argparse.ArgumentTypeError(f"seeds must be distinct non-negative integers, got {text!r}")
    return out


def prog(name: str) -> str:
    """How an experiment is called."""
    return f"python -m dpoq_jax.experiments.{name}"


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
    from dpoq_jax.parser import Parser  # one-line usage errors, defaults in --help, as every dpoq command

    parser = Parser(prog=prog(name), description=doc.split("\n\n")[0], parents=list(parents))
    parser.add_argument("--quick", action="store_true", help="small smoke-test version (minutes)")
    parser.add_argument(
        "--config",
        default=default_config(task),
        help="training configs: PREFIX[:arg] (PREFIX_sft.py, PREFIX_dpo.py) or FILE.py[:arg] taking the "
        "stage last; "
        "default: the packaged tiny configs of the task",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="seeds of data, initialisation and sampling, e.g. 0,1,2,3,4 or 0-4; each runs the whole "
        f"experiment (default {','.join(map(str, DEFAULT_SEEDS['full']))}; --quick: "
        f"{','.join(map(str, DEFAULT_SEEDS['quick']))})",
    )
    parser.add_argument(
        "--workdir", default=f"runs/experiments/{task}", help="where the training runs go (seed<N>/ each)"
    )
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
    """Parse argv; adds args.overrides (the user's config overrides) and args.command (the command
    line that reproduces the run)."""
    del task
    args, rest = parser.parse_known_args(list(argv))
    args.overrides = check_overrides(rest, parser)
    args.command = command_line(prog(name), argv)
    return args


def parse_args(module: ModuleType, argv: Sequence[str], results_dir: Path | str) -> argparse.Namespace:
    """The options of an experiment module: the common ones, its TASKS choice and its add_args hook."""
    task, parents = module.TASK, []
    if hasattr(module, "TASKS"):  # --task picks the defaults of the other options, so it is read first
        task_parser = argparse.ArgumentParser(add_help=False)
        task_parser.add_argument("--task", default=module.TASK, choices=module.TASKS, help="synthetic task")
        task = task_parser.parse_known_args(list(argv))[0].task
        parents = [task_parser]
    parser = experiment_parser(module.NAME, module.__doc__, task, results_dir, parents=parents)
    if hasattr(module, "add_args"):
        module.add_args(parser)
    args = parse_experiment_args(parser, argv, module.NAME, task)
    args.task = task
    if task != module.TASK and args.results == str(Path(results_dir) / f"{module.NAME}.md"):
        args.results = str(Path(results_dir) / f"{module.NAME}_{task}.md")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS["quick" if args.quick else "full"]
    return args


def run_seeds(
    run: Callable[[argparse.Namespace, dict], Report],
    verdicts: Callable[[Mapping[str, Any], dict], dict[str, Verdict]],
    args: argparse.Namespace,
    scale: dict,
) -> Report:
    """Run one experiment per seed (runs in <workdir>/seed<N>) and merge the reports (intervals,
    verdicts from them); the wall time goes into the report's Run table.

    A seed's report is kept in <workdir>/seed<N>/<report file> with its settings, and a later call
    with the same settings reuses it (as finished training runs are reused): seeds can run as
    separate processes (`--seeds 3`) and one `--seeds 0-4` call then merges them. Delete the file to
    recompute a seed after changing the experiment's code.
    """
    t0, reports, seconds = time.time(), [], []
    rules = code_commit()  # the sources this process imported are those of the tree as it starts
    for s in args.seeds:
        log(f"seed {s} ({len(reports) + 1} of {len(args.seeds)})")
        a = argparse.Namespace(**{**vars(args), "seed": s, "workdir": str(Path(args.workdir) / f"seed{s}")})
        cache, *legacy = report_caches(run, a)
        key = json.dumps(
            {"scale": scale, "seed": s, "args": {k: v for k, v in vars(a).items() if k not in VOLATILE}},
            sort_keys=True,
            default=str,
        )
        saved = next((x for x in map(_saved_report, (cache, *legacy)) if x and x["key"] == key), None)
        if saved is not None:
            log(f"  reusing the finished seed {s}: {cache}")
            reports.append(saved["report"])
            seconds.append(saved["seconds"])
            continue
        t1 = time.time()
        reports.append(run(a, scale))
        seconds.append(time.time() - t1)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")  # whole or not at all
        tmp.write_bytes(pickle.dumps({"key": key, "report": reports[-1], "seconds": seconds[-1]}))
        tmp.replace(cache)
    report = seeds_lib.merge_reports(reports, args.seeds, lambda numbers: verdicts(numbers, scale))
    if getattr(args, "command", None):
        report.meta["command"] = args.command  # this call's, not the seed's that ran first
    report.meta["wall time"] = f"{time.time() - t0:.0f} s for this call; per seed when it ran: " + ", ".join(
        f"{x:.0f} s" for x in seconds
    )
    # the rules the verdicts were judged by are the code's as this call started (what it imported): its
    # commit, and when this judging call started
    report.meta["verdict rules (code commit)"] = rules
    report.meta["judged at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0))
    return report


def report_caches(run: Callable, a: argparse.Namespace) -> list[Path]:
    """Where a seed's finished report is kept: <workdir>/report_<experiment NAME>_<task>.pkl, then the
    name used before 2026-12-07 (the run function's module name, "__main__" under `python -m`, which
    experiments sharing a workdir overwrote in turn; still read, the key decides)."""
    module = getattr(run, "__module__", "experiment")
    old = module.rsplit(".", 1)[-1]
    name = getattr(sys.modules.get(module), "NAME", None) or old
    task = getattr(a, "task", "")
    return [Path(a.workdir) / f"report_{n}_{task}.pkl" for n in dict.fromkeys((name, old))]


def _saved_report(path: Path) -> dict | None:
    try:
        return pickle.loads(path.read_bytes()) if path.exists() else None
    except Exception:  # noqa: BLE001 (a torn or stale pickle raises many kinds)
        return None  # unreadable: run the seed again


def with_defaults(
    module: ModuleType, argv: Sequence[str] | None, scales: dict[str, dict] | None
) -> tuple[list[str], dict[str, dict]]:
    """An experiment's main arguments: the command line's and the module's SCALES unless given."""
    return list(sys.argv[1:] if argv is None else argv), scales or module.SCALES


def experiment_main(
    module: ModuleType,
    argv: Sequence[str] | None = None,
    scales: dict[str, dict] | None = None,
    results_dir: Path | str = RESULTS_DIR,
) -> int:
    """`python -m dpoq_jax.experiments.<name>`: parse, run every seed, write the merged report."""
    argv, scales = with_defaults(module, argv, scales)
    args = parse_args(module, argv, results_dir)
    scale = scales["quick" if args.quick else "full"]
    return write_report(module.NAME, run_seeds(module.run, module.verdicts, args, scale), args.results)


def config_label(config: str) -> str:
    """How a report names a config (PATH[:arg]): a packaged one as its package resource
    (dpoq_jax/configs/NAME), one under the working directory relative to it, any other as given.
    No absolute path of the machine that ran it."""
    base, sep, arg = config.partition(":")
    where = Path(base).resolve()
    for root, prefix in ((Path(__file__).resolve().parents[1], Path("dpoq_jax")), (Path.cwd(), Path())):
        if where.is_relative_to(root):
            return f"{(prefix / where.relative_to(root)).as_posix()}{sep}{arg}"
    return config


def run_meta(args: argparse.Namespace) -> dict[str, str]:
    """The "Run" table of an experiment's report: how to reproduce it, and where it ran."""
    return {"command": args.command, "seed": str(args.seed), "config": config_label(args.config),
            **machine_info()}  # fmt: skip


HISTORY = "## History: the earlier results files"


def with_history(new_md: str, old_md: str | None) -> str:
    """The new results file with the one it replaces kept at its end (older ones after it): under
    HISTORY, each in a collapsed block, headings moved two levels down, figure links dropped (the
    figures are overwritten), so the first runs' numbers stay readable beside the new ones."""
    if not old_md or not old_md.strip():
        return new_md
    body, _, older = old_md.partition(f"\n{HISTORY}\n")
    lines = []
    for line in body.strip().splitlines():
        if line.startswith("!["):
            continue
        if line.startswith("#"):
            line = "#" * min(line.count("#", 0, line.index(" ")) + 2, 6) + line[line.index(" ") :]
        lines.append(line)
    title = next((ln.lstrip("# ") for ln in body.splitlines() if ln.startswith("# ")), "results")
    judged = re.search(r"^\| (?:judged at|date) \| ([^|]+) \|", body, flags=re.M)
    when = judged.group(1).strip() if judged else "an earlier run"
    entry = (
        f"<details><summary>{title}: the file as written on {when}</summary>\n\n"
        + "\n".join(lines)
        + "\n\n</details>"
    )
    return f"{new_md.rstrip()}\n\n{HISTORY}\n\n{entry}\n{older.rstrip()}\n".rstrip() + "\n"


def write_report(name: str, report: Report, md_path: Path | str) -> int:
    """Write an experiment's results (Markdown and figures) and say where; the script's exit code. A
    results file it replaces is kept in the new one's history section (`with_history`)."""
    md_path = Path(md_path)
    old = md_path.read_text(encoding="utf-8") if md_path.exists() else None
    paths = report.write(md_path)
    md_path.write_text(with_history(md_path.read_text(encoding="utf-8"), old), encoding="utf-8")
    log(f"{name}: wrote {', '.join(str(p) for p in paths)}")
    return 0
