"""`dpoq demo`: the paper's three findings, small, end to end, offline, on the CPU (minutes).

Trains tiny models from random initialisation on the bundled synthetic tasks and writes one report:
  1. credit assignment: SFT then DPO on error_injection; per-token implicit rewards of held-out pairs
     (heatmap), top-1 localisation and AUROC of injected tokens against the reference alone and chance;
  2. search: DPO on dense_reward; gold win rate, gold reward and length against beam width;
  3. implicit rewards during DPO with and without an SFT'd reference, and the §5.4 identity.
Output: OUT/report.html (self-contained), OUT/report.md (+ OUT/report_figures/*.png); the training runs
go to OUT/work (a rerun reuses finished runs). The experiment drivers live in the repository's
experiments/ folder (`python -m experiments.<name>` runs their full versions).

    dpoq demo [--out runs/demo] [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Scales: steps and sizes of each part (the full experiments use larger ones).
SCALES = {
    "demo": {
        "credit": dict(sft_steps=500, dpo_steps=300, betas=(0.03, 0.1, 0.3), n_eval=256, eval_every=20),
        "implicit": dict(sft_steps=500, dpo_steps=300, beta=0.1, eval_every=20, n_check=128),
        "search": dict(
            sft_steps=300, dpo_steps=300, betas=(0.1, 1.0), beams=(1, 2, 5, 10, 20), n_prompts=256
        ),
    },
    "quick": {
        "credit": dict(sft_steps=40, dpo_steps=20, betas=(0.1,), n_eval=32, eval_every=10),
        "implicit": dict(sft_steps=40, dpo_steps=20, beta=0.1, eval_every=10, n_check=16),
        "search": dict(sft_steps=40, dpo_steps=20, betas=(0.3,), beams=(1, 2), n_prompts=32),
    },
}


def _experiments_importable() -> None:
    """The drivers live in <repo>/experiments (beside the configs they train with)."""
    try:
        import experiments.common  # noqa: F401

        return
    except ImportError:
        pass
    root = Path(__file__).resolve().parents[1]
    if not (root / "experiments" / "common.py").exists():
        raise SystemExit(
            f"dpoq demo: the experiments/ folder was not found next to {root / 'dpoq_jax'}; "
            "run the demo from a clone of the repository (pip install -e .)"
        )
    sys.path.insert(0, str(root))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from dpoq_jax.cli import Parser

    p = Parser(prog="dpoq demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a much smaller smoke run (about a minute)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tasks and the training runs")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    _experiments_importable()
    from experiments import common, credit_assignment, implicit_rewards, search_overopt

    scale = SCALES["quick" if args.quick else "demo"]
    out = Path(args.out)
    work = out / "work"
    command = "dpoq demo " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.time()
    common.log(f"dpoq demo: writing to {out} ({'quick' if args.quick else 'demo'} scale)")

    def ns(task: str, name: str) -> argparse.Namespace:
        return argparse.Namespace(
            config=common.default_config(task),
            seed=args.seed,
            workdir=str(work / task),
            overrides=[],
            command=command,
            task=task,
            heatmap_pairs=4,
            results=None,
            quick=args.quick,
        )

    timings, reports = [], []
    parts = (
        ("1", "credit assignment", credit_assignment, ns("error_injection", "credit"), scale["credit"]),
        ("2", "implicit rewards", implicit_rewards, ns("error_injection", "implicit"), scale["implicit"]),
        ("3", "beam search", search_overopt, ns("dense_reward", "search"), scale["search"]),
    )
    for num, label, module, a, sc in parts:
        t0 = time.time()
        common.log(f"[{num}/3] {label}")
        reports.append((num, module.run(a, sc)))
        timings.append([f"{num}. {label}", f"{time.time() - t0:.0f}"])
    total = time.time() - t_start
    timings.append(["total", f"{total:.0f}"])

    report = common.Report(
        "dpoq demo: your language model is secretly a Q-function",
        intro=(
            "Tiny decoders trained from scratch on the synthetic tasks of dpoq_jax (CPU, offline), "
            "reproducing the three findings of Rafailov et al. (2024) in miniature: DPO's per-token "
            "implicit rewards do credit assignment; beam search on a DPO policy is reward search and can "
            "over-optimise; implicit rewards of the chosen responses fall during DPO when the reference "
            "was fine-tuned on them (§5.4). The full experiments: `python -m experiments.<name>`."
        ),
    )
    for num, rep in reports:
        title = rep.title.split(": ", 1)[-1]
        report.add(f"{num}. {title[:1].upper()}{title[1:]}", rep.intro)
        for sec in rep.sections:
            report.add(f"{num}. {sec.title}", sec.text, *sec.items)
    report.add("Timings (seconds, wall clock, this machine)", "", common.Table(["part", "seconds"], timings))
    report.meta = {"command": command, "seed": str(args.seed), **common.machine_info()}
    paths = report.write(out / "report.md", out / "report.html")
    common.log(f"dpoq demo: done in {total:.0f}s")
    print(f"\nReport:  {(out / 'report.html').resolve()}\nSummary: {(out / 'report.md').resolve()}")
    del paths
    return 0


if __name__ == "__main__":
    sys.exit(main())
