"""`dpoq demo`: three claims of the paper, small, end to end, offline, on the CPU (minutes).

Trains tiny models from random initialisation on the bundled synthetic tasks (the packaged configs
dpoq_jax/configs/), once per seed, and writes one report, a section per claim; every number is a mean
with its 95% interval over the seeds, and every verdict is computed from those intervals:
  1. credit assignment (paper §3): per-token implicit rewards of held-out error_injection pairs,
     top-1 localisation and AUROC of the injected tokens against the reference alone, the position
     (later = more suspicious) and chance,
     with errors the reference cannot tell (fluent) and errors it finds surprising;
  2. search (paper §4): DPO on dense_reward with and without a length-biased labeller; gold win rate,
     gold reward and length against beams;
  3. implicit rewards during DPO (paper §5) with and without an SFT'd reference, and the identity
     E_{π_ref}[β log π/π_ref] = −β KL.
Output: OUT/report.html (self-contained), OUT/report.md (+ OUT/report_figures/*.png); the training runs
go to OUT/work (a rerun reuses finished runs). The experiments are dpoq_jax.experiments (in a clone,
`python -m dpoq_jax.experiments.<name>` runs their full versions). Runs from an installed package: nothing
outside it is read.

    dpoq demo [--out runs/demo] [--quick] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# Scales: steps and sizes of each part (the full experiments use larger ones).
# Scales: steps and sizes of each part (the full experiments use larger ones), and the default seeds.
SCALES = {
    "demo": {
        "credit": dict(
            sft_steps=400,
            dpo_steps=200,
            settings={"fluent": (0.1,), "surprising": (0.1,)},
            n_eval=256,
            n_gen=128,
            eval_every=20,
        ),
        "implicit": dict(sft_steps=400, dpo_steps=200, beta=0.1, eval_every=20, n_check=128, n_gen=128),
        "search": dict(
            sft_steps=300,
            dpo_steps=150,
            betas=(0.1, 1.0),
            beams=(1, 2, 5, 10, 20),
            n_prompts=64,
            eval_every=25,
        ),
    },
    "quick": {
        "credit": dict(
            sft_steps=40, dpo_steps=20, settings={"surprising": (0.1,)}, n_eval=32, n_gen=16, eval_every=10
        ),
        "implicit": dict(sft_steps=40, dpo_steps=20, beta=0.1, eval_every=10, n_check=16, n_gen=16),
        "search": dict(
            sft_steps=40,
            dpo_steps=20,
            betas=(0.3,),
            beams=(1, 2),
            n_prompts=32,
            eval_every=10,
            settings=("biased",),
        ),
    },
}
SEEDS = {"demo": (0, 1, 2), "quick": (0,)}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from dpoq_jax.experiments.harness import seed_list
    from dpoq_jax.parser import Parser

    p = Parser(prog="dpoq demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--quick", action="store_true", help="a much smaller smoke run (about a minute)")
    p.add_argument(
        "--seeds",
        type=seed_list,
        default=None,
        help="seeds of the tasks and the training runs, e.g. 0,1,2 (default 0,1,2; --quick: 0)",
    )
    args = p.parse_args(list(argv))
    if args.seeds is None:
        args.seeds = SEEDS["quick" if args.quick else "demo"]
    return args


def next_steps(
    credit_runs: dict[str, Path],
    search_runs: dict[str, Path],
    out: Path,
    betas: tuple[float, float],
    seed: int,
) -> str:
    """What to try next, with the run folders this demo wrote (and its task seed and split)."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    dpo, sft, out = credit_runs["dpo"], credit_runs["sft"], out.resolve()
    return "\n".join(
        [
            "Try next (the run folders this demo trained):",
            "  # per-token implicit rewards of held-out error_injection pairs, as HTML and PNG heatmaps",
            f"  dpoq score --policy {q(dpo)} --reference {q(sft)} --tokenizer synthetic "
            f"--synthetic error_injection --split test --task-seed {seed} --n 256 --beta {betas[0]} "
            f"--out-dir {q(out / 'score')}",
            "  # beam search on the dense_reward DPO policy, with its implicit rewards",
            f"  dpoq generate --model {q(search_runs['dpo'])} --reference {q(search_runs['sft'])} "
            f"--tokenizer synthetic --synthetic dense_reward --split test --task-seed {seed} "
            f"--beta {betas[1]} --mode beam --num-beams 5 --max-new-tokens 33 --out {q(out / 'beams.jsonl')}",
            "  # the DPO policy's final checkpoint as a Hugging Face folder",
            f"  dpoq convert --from {q(dpo)} --to {q(out / 'export_hf')}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from dpoq_jax.analysis import document as doc
    from dpoq_jax.experiments import credit_assignment, harness, implicit_rewards, search_overopt
    from dpoq_jax.experiments.runs import default_config

    scale = SCALES["quick" if args.quick else "demo"]
    out = Path(args.out)
    work = out / "work"
    command = doc.command_line("dpoq demo", argv)
    t_start = time.time()
    doc.log(f"dpoq demo: writing to {out} ({'quick' if args.quick else 'demo'} scale)")

    def ns(task: str) -> argparse.Namespace:
        return argparse.Namespace(
            config=default_config(task),
            seeds=args.seeds,
            workdir=str(work / task),
            overrides=[],
            command=command,
            task=task,
            heatmap_pairs=4,
            results=None,
            quick=args.quick,
        )

    # Run order: implicit rewards reuses the credit-assignment runs; the report follows the paper.
    parts = {
        "credit": ("credit assignment", credit_assignment, ns("error_injection")),
        "implicit": ("implicit rewards", implicit_rewards, ns("error_injection")),
        "search": ("beam search", search_overopt, ns("dense_reward")),
    }
    reports, timings = {}, []
    for i, (key, (label, module, a)) in enumerate(parts.items(), 1):
        t0 = time.time()
        doc.log(f"[{i}/{len(parts)}] {label}")
        reports[key] = harness.run_seeds(module.run, module.verdicts, a, scale[key])
        timings.append([label, f"{time.time() - t0:.0f}"])
    total = time.time() - t_start
    timings.append(["total", f"{total:.0f}"])

    order = ("credit", "search", "implicit")
    report = doc.Report(
        "dpoq demo: your language model is secretly a Q-function",
        intro=(
            "Tiny decoders trained from scratch on the synthetic tasks of dpoq_jax (CPU, offline) test "
            'three claims of Rafailov et al. (2024), "From r to Q*", in miniature. Each section states '
            "the claim, shows the numbers, and ends with a verdict computed from them: holds, partly, "
            "or does not hold. The verdicts are about these small, briefly trained models, not about "
            "the paper's 2.8B-parameter ones. "
            + (
                f"Seeds {', '.join(map(str, args.seeds))}: each number is a mean over the seeds, written "
                "mean [lo, hi]: accuracies, AUROCs, win rates, gold scores and their paired differences "
                "with the wider of a two-level bootstrap interval (seeds, then held-out prompts) and the "
                "seed-level t-interval, inside the statistic's range; training-curve values with the "
                "Student-t interval over seeds; the verdicts are computed from these intervals."
                if len(args.seeds) > 1
                else f"One seed ({args.seeds[0]}): statistics of held-out prompts carry their item-level "
                "bootstrap interval (prompts resampled), other numbers are point estimates; run with "
                "--seeds 0,1,2 for intervals over seeds."
            )
            + (
                "\n\nThis is the `--quick` scale: a smoke test of the pipeline; its numbers are too small "
                "to read anything from. Run `dpoq demo` without `--quick` for the demo scale."
                if args.quick
                else ""
            )
        ),
    )
    report.add(
        "At a glance",
        "One line per claim; the why of each verdict is at the end of its section.",
        doc.Table(
            ["section", "claim", "verdict"],
            [[f"{n}", reports[k].verdict.claim, reports[k].verdict.status] for n, k in enumerate(order, 2)],
        ),
    )
    for key in order:
        rep = reports[key]
        title = rep.title.split(": ", 1)[-1]
        part = report.add(f"{title[:1].upper()}{title[1:]}", rep.intro)
        part.verdict = rep.verdict  # ends the section, after its subsections
        for sec in rep.sections:
            sub = report.add(sec.title, sec.text, *sec.items, level=2)
            if sec.verdict is not rep.verdict:
                sub.verdict = sec.verdict
    report.add("Timings", "Seconds, wall clock, this machine.", doc.Table(["part", "seconds"], timings))
    first_setting = next(iter(credit_assignment.settings_of(scale["credit"]).values()))
    betas = (credit_assignment.main_beta(first_setting), scale["search"]["betas"][0])  # the run_dirs' β
    tips = next_steps(reports["credit"].run_dirs, reports["search"].run_dirs, out, betas, args.seeds[0])
    report.add("What to try next", "```\n" + tips + "\n```")
    report.meta = {"command": command, "seeds": ", ".join(map(str, args.seeds)), **doc.machine_info()}
    report.write(out / "report.md", out / "report.html")
    doc.log(f"dpoq demo: done in {total:.0f}s")
    print(f"\nReport:  {(out / 'report.html').resolve()}\nSummary: {(out / 'report.md').resolve()}\n")
    print(tips)
    return 0


if __name__ == "__main__":
    sys.exit(main())
