"""Experiment 3: implicit rewards during DPO training, with and without an SFT'd reference (PAPER.md §5).

(a) reference = SFT on the chosen responses; (b) reference = the same network without that SFT (random
init). DPO from each, logging on held-out pairs every few steps the chosen and rejected implicit
rewards β Σ log π/π_ref, their margin and the chosen log-likelihood (the paper's Fig. 3). Then
checks §5.4 numerically on held-out prompts: for responses sampled from π_ref,
E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π) — exactly per state over the vocabulary, and by the
Monte-Carlo estimate from the sampled tokens. Writes experiments/results/implicit_rewards.md.

    python -m experiments.implicit_rewards            # full
    python -m experiments.implicit_rewards --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402

NAME = "implicit_rewards"
SCALES = {
    "full": dict(sft_steps=600, dpo_steps=400, beta=0.1, eval_every=20, n_check=256),
    "quick": dict(sft_steps=150, dpo_steps=100, beta=0.1, eval_every=20, n_check=64),
}
CURVES = (
    ("rewards/chosen", "chosen implicit reward"),
    ("rewards/rejected", "rejected implicit reward"),
    ("rewards/margins", "margin (chosen − rejected)"),
    ("logps/chosen", "chosen log-likelihood"),
)
RUN_LABELS = {"sft_ref": "(a) reference SFT'd on chosen", "no_sft_ref": "(b) reference without SFT"}


def curves_figure(runs: dict[str, list[dict]]) -> common.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.3 * len(CURVES), 3.0))
    for name, rows in runs.items():
        steps = [r["step"] for r in rows]
        for ax, (key, title) in zip(axes, CURVES, strict=True):
            ax.plot(steps, [r[key] for r in rows], "-", label=RUN_LABELS.get(name, name))
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("DPO step")
    for ax in axes[:3]:
        ax.axhline(0, color="gray", lw=0.6)
    axes[0].legend(fontsize=7)
    return common.Figure(
        "training_curves",
        common.fig_to_png(fig),
        "Held-out implicit rewards and chosen log-likelihood during DPO",
    )


def section54_check(policy, ref, prompts: list[list[int]], beta: float, max_new: int, seed: int) -> dict:
    """Sample responses from π_ref; compare the exact per-state −βKL with the sampled log-ratios."""
    from dpoq_jax import tokenq

    outs = common.sample(ref, prompts, max_new_tokens=max_new, seed=seed)
    pol_logits = common.response_logits(policy, prompts, outs)
    ref_logits = common.response_logits(ref, prompts, outs)
    R = max(len(o) for o in outs)
    V = pol_logits[0].shape[-1]
    pol_BRV, ref_BRV = np.zeros((len(outs), R, V), np.float32), np.zeros((len(outs), R, V), np.float32)
    tgt_BR, mask_BR = np.zeros((len(outs), R), np.int32), np.zeros((len(outs), R), np.float32)
    for i, o in enumerate(outs):
        pol_BRV[i, : len(o)], ref_BRV[i, : len(o)] = pol_logits[i], ref_logits[i]
        tgt_BR[i, : len(o)], mask_BR[i, : len(o)] = o, 1.0
    exact = np.asarray(tokenq.expected_ref_reward(pol_BRV, ref_BRV, beta))
    lp = np.asarray(tokenq.token_logps(pol_BRV, tgt_BR, mask_BR))
    lr = np.asarray(tokenq.token_logps(ref_BRV, tgt_BR, mask_BR))
    sampled = np.asarray(tokenq.implicit_rewards(lp, lr, mask_BR, beta))
    return common.section54_summary(exact, sampled, mask_BR) | {"responses": len(outs)}


def run(args: argparse.Namespace, scale: dict) -> common.Report:
    """Train (or reuse finished runs of the same settings in args.workdir), check, build the report."""
    if common.at_scale(args, args.task):  # the user's configs keep their own steps and eval cadence
        scale = dict(scale, sft_steps=None, dpo_steps=None, eval_every=None)
    beta = scale["beta"]
    steps = {k: scale[k] or "the config's" for k in ("sft_steps", "dpo_steps")}
    common.log(f"{NAME}: SFT reference on chosen responses ({steps['sft_steps']} steps)")
    sft_dir = common.train_sft(args, "chosen", scale["sft_steps"])  # (a): reference SFT'd on chosen
    # Run (a) has the settings of experiments.credit_assignment's run of the same β, so a finished
    # one there is reused rather than trained again.
    run_dirs = {}
    for name, init in (("sft_ref", sft_dir), ("no_sft_ref", None)):
        common.log(f"{NAME}: DPO run {RUN_LABELS[name]} ({steps['dpo_steps']} steps, β={beta})")
        run_dirs[name] = common.train_dpo(
            args, beta, scale["dpo_steps"], init, eval_every=scale["eval_every"]
        )
    keys = [k for k, _ in CURVES] + ["rewards/accuracies"]
    curves = {name: common.eval_curve(d, keys) for name, d in run_dirs.items()}

    rows = []
    for name, c in curves.items():
        first, last = c[0], c[-1]
        rows.append(
            [RUN_LABELS[name]]
            + [f"{first[k]:.3f} → {last[k]:.3f}" for k, _ in CURVES]
            + [last["rewards/accuracies"]]
        )

    check_rows = []
    prompts, max_new = common.heldout_prompts(
        args.config, args.overrides, args.task, scale["n_check"], args.seed
    )
    for name, d in run_dirs.items():
        common.log(f"{NAME}: §5.4 check for {RUN_LABELS[name]}")
        ref = common.load_model(sft_dir) if name == "sft_ref" else common.load_model(d, which="initial")
        s = section54_check(common.load_model(d), ref, prompts, beta, max_new, args.seed)
        check_rows.append(
            [
                RUN_LABELS[name],
                s["responses"],
                s["tokens"],
                s["exact_mean"],
                s["mc_mean"],
                s["mc_se"],
                (s["mc_mean"] - s["exact_mean"]) / max(s["diff_se"], 1e-12),
                s["exact_max"],
            ]
        )

    data_name = args.task if args.config == common.default_config(args.task) else args.config
    report = common.Report(
        "Experiment 3: implicit rewards during DPO training",
        intro=(
            "Paper §5.4 (PAPER.md §5): E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π) ≤ 0, so when the "
            "reference was fine-tuned on the chosen responses (they are then samples of π_ref), their "
            "implicit reward is expected to fall during DPO while the margin grows; without that SFT "
            f"there is no such trend. Data: {data_name}; "
            f"β = {beta}; curves on held-out pairs. Run (b) starts from the SFT stage's own initialisation "
            "(random here; the base model at scale)."
        ),
    )
    report.add(
        "Training curves",
        "First → last held-out value of each curve, and the final held-out preference accuracy.",
        common.Table(["run"] + [t for _, t in CURVES] + ["final pref. accuracy"], rows),
        curves_figure(curves),
    )
    report.add(
        "§5.4 identity on held-out prompts",
        "Responses sampled from π_ref (temperature 1) on held-out prompts; at every visited state: the "
        "exact E_{a~π_ref}[β log π/π_ref] over the whole vocabulary (= −β KL(π_ref‖π), from "
        "`tokenq.expected_ref_reward`), and the one-sample Monte-Carlo estimate β log π/π_ref of the "
        "token π_ref sampled. Means per token; z = (MC − exact) / standard error of the difference "
        "(|z| < 2 is what the identity predicts); the largest exact value must be ≤ 0.",
        common.Table(
            ["run", "responses", "tokens", "exact mean (−βKL)", "MC mean", "MC s.e.", "z", "max exact"],
            check_rows,
        ),
    )
    report.meta = common.run_meta(args)
    return report


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    # --task picks the defaults of the other options, so it is read first.
    task_parser = argparse.ArgumentParser(add_help=False)
    task_parser.add_argument(
        "--task",
        default="error_injection",
        choices=("error_injection", "dense_reward"),
        help="synthetic task",
    )
    task = task_parser.parse_known_args(argv)[0].task
    parser = common.experiment_parser(NAME, __doc__, task, parents=[task_parser])
    args = common.parse_experiment_args(parser, argv, NAME, task)
    if args.task != "error_injection" and args.results == str(common.RESULTS_DIR / f"{NAME}.md"):
        args.results = str(common.RESULTS_DIR / f"{NAME}_{args.task}.md")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return common.write_report(NAME, run(args, SCALES["quick" if args.quick else "full"]), args.results)


if __name__ == "__main__":
    sys.exit(main())
