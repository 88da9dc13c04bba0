"""Experiment 3: implicit rewards during DPO training, with and without an SFT'd reference (paper §5.4).

(a) reference = SFT on the chosen responses; (b) reference = the same network without that SFT (random
init). DPO from each, logging on held-out pairs every few steps the chosen and rejected implicit
rewards β Σ log π/π_ref, their margin and the chosen log-likelihood (the paper's Fig. 3). Then
checks §5.4 numerically on held-out prompts: for responses sampled from π_ref,
E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π) — exactly per state over the vocabulary, and by the
Monte-Carlo estimate from the sampled tokens.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.credit import response_logits
from dpoq_jax.analysis.metrics import section54_summary
from dpoq_jax.decode.sampling import sample_responses
from dpoq_jax.experiments import cli
from dpoq_jax.train import runs
from dpoq_jax.train.metrics import eval_curve

NAME = "implicit_rewards"
CLAIM = (
    "with an SFT'd reference the chosen responses' implicit reward falls during DPO while the margin "
    "grows, and E_{π_ref}[β log π/π_ref] = −β KL ≤ 0 (paper §5.4)"
)
CURVES = (
    ("rewards/chosen", "chosen implicit reward"),
    ("rewards/rejected", "rejected implicit reward"),
    ("rewards/margins", "margin (chosen − rejected)"),
    ("logps/chosen", "chosen log-likelihood"),
)
RUN_LABELS = {"sft_ref": "(a) reference SFT'd on chosen", "no_sft_ref": "(b) reference without SFT"}
Z_LIMIT = 2.0  # |z| of MC − exact within which the identity is read as holding (two standard errors)


def curves_figure(runs_: dict[str, list[dict]]) -> doc.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CURVES), figsize=(3.3 * len(CURVES), 3.0))
    for name, rows in runs_.items():
        steps = [r["step"] for r in rows]
        for ax, (key, title) in zip(axes, CURVES, strict=True):
            ax.plot(steps, [r[key] for r in rows], "-", label=RUN_LABELS.get(name, name))
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("DPO step")
    for ax in axes[:3]:
        ax.axhline(0, color="gray", lw=0.6)
    axes[0].legend(fontsize=7)
    return doc.Figure(
        "training_curves",
        doc.fig_to_png(fig),
        "Held-out implicit rewards and chosen log-likelihood during DPO",
    )


def section54_check(policy, ref, prompts: list[list[int]], beta: float, max_new: int, seed: int) -> dict:
    """Sample responses from π_ref; compare the exact per-state −βKL with the sampled log-ratios."""
    from dpoq_jax import tokenq

    outs = sample_responses(ref, prompts, max_new_tokens=max_new, seed=seed)
    pol_logits = response_logits(policy, prompts, outs)
    ref_logits = response_logits(ref, prompts, outs)
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
    return section54_summary(exact, sampled, mask_BR) | {"responses": len(outs)}


def verdict(curves: dict[str, list[dict]], checks: dict[str, dict]) -> doc.Verdict:
    """Four checks read off the numbers: in run (a) the chosen reward falls and the margin grows; it
    falls more with the SFT'd reference than without; in every run the sampled log-ratio agrees with
    the exact −βKL within Z_LIMIT standard errors and the exact value is never positive."""
    a, b = curves["sft_ref"], curves["no_sft_ref"]
    d_a = a[-1]["rewards/chosen"] - a[0]["rewards/chosen"]
    d_b = b[-1]["rewards/chosen"] - b[0]["rewards/chosen"]
    m0, m1 = a[0]["rewards/margins"], a[-1]["rewards/margins"]
    zs = {name: (s["mc_mean"] - s["exact_mean"]) / max(s["diff_se"], 1e-12) for name, s in checks.items()}
    max_exact = max(s["exact_max"] for s in checks.values())
    z_text = ", ".join(f"{z:+.2f}" for z in zs.values())
    tests = [
        (d_a < 0, f"(a) chosen reward {'falls' if d_a < 0 else 'does not fall'} ({d_a:+.3f})"),
        (m1 > m0, f"(a) margin {'grows' if m1 > m0 else 'does not grow'} ({m0:.3f} → {m1:.3f})"),
        (d_a < d_b, f"{'more' if d_a < d_b else 'no more'} than without SFT ((b): {d_b:+.3f})"),
        (
            all(abs(z) < Z_LIMIT for z in zs.values()) and max_exact <= 1e-6,
            f"sampled vs exact −βKL z = {z_text} (|z| < {Z_LIMIT:g} expected), max exact {max_exact:.2g}",
        ),
    ]
    status, why = doc.grade(tests)
    return doc.Verdict(CLAIM, status, why)


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """Train (or reuse finished runs of the same settings in args.workdir), check, build the report."""
    if runs.at_scale(args, args.task):  # the user's configs keep their own steps and eval cadence
        scale = dict(scale, sft_steps=None, dpo_steps=None, eval_every=None)
    beta = scale["beta"]
    steps = {k: scale[k] or "the config's" for k in ("sft_steps", "dpo_steps")}
    doc.log(f"{NAME}: SFT reference on chosen responses ({steps['sft_steps']} steps)")
    sft_dir = runs.train_sft(args, "chosen", scale["sft_steps"])  # (a): reference SFT'd on chosen
    # Run (a) has the settings of the credit_assignment experiment's run of the same β, so a finished
    # one there is reused rather than trained again.
    run_dirs = {}
    for name, init in (("sft_ref", sft_dir), ("no_sft_ref", None)):
        doc.log(f"{NAME}: DPO run {RUN_LABELS[name]} ({steps['dpo_steps']} steps, β={beta})")
        run_dirs[name] = runs.train_dpo(args, beta, scale["dpo_steps"], init, eval_every=scale["eval_every"])
    keys = [k for k, _ in CURVES] + ["rewards/accuracies"]
    curves = {name: eval_curve(str(d), keys) for name, d in run_dirs.items()}

    rows = []
    for name, c in curves.items():
        first, last = c[0], c[-1]
        rows.append(
            [RUN_LABELS[name]]
            + [f"{first[k]:.3f} → {last[k]:.3f}" for k, _ in CURVES]
            + [last["rewards/accuracies"]]
        )

    check_rows, checks = [], {}
    prompts, max_new = runs.heldout_prompts(
        args.config, args.overrides, args.task, scale["n_check"], args.seed
    )
    for name, d in run_dirs.items():
        doc.log(f"{NAME}: §5.4 check for {RUN_LABELS[name]}")
        ref = runs.load_run_model(sft_dir) if name == "sft_ref" else runs.load_run_model(d, which="initial")
        s = checks[name] = section54_check(runs.load_run_model(d), ref, prompts, beta, max_new, args.seed)
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

    data_name = args.task if args.config == runs.default_config(args.task) else args.config
    report = doc.Report(
        "Experiment 3: implicit rewards during DPO training",
        intro=(
            "Claim (paper §5.4, why implicit rewards fall during DPO): E_{a~π_ref}[β log π/π_ref] = "
            "−β KL(π_ref‖π) ≤ 0, so when the reference was fine-tuned on the chosen responses (they are "
            "then samples of π_ref), their implicit reward is expected to fall during DPO while the "
            "margin grows; without that SFT there is no such trend. "
            f"Data: {data_name}; β = {beta}; curves on held-out pairs. Run (b) starts from the SFT "
            "stage's own initialisation (random here; the base model at scale)."
        ),
    )
    report.add(
        "Training curves",
        "First → last held-out value of each curve, and the final held-out preference accuracy.",
        doc.Table(["run"] + [t for _, t in CURVES] + ["final pref. accuracy"], rows),
        curves_figure(curves),
    )
    identity = report.add(
        "The §5.4 identity on held-out prompts",
        "Responses sampled from π_ref (temperature 1) on held-out prompts; at every visited state: the "
        "exact E_{a~π_ref}[β log π/π_ref] over the whole vocabulary (= −β KL(π_ref‖π), from "
        "`tokenq.expected_ref_reward`), and the one-sample Monte-Carlo estimate β log π/π_ref of the "
        "token π_ref sampled. Means per token; z = (MC − exact) / standard error of the difference "
        f"(|z| < {Z_LIMIT:g} is what the identity predicts); the largest exact value must be ≤ 0.",
        doc.Table(
            ["run", "responses", "tokens", "exact mean (−βKL)", "MC mean", "MC s.e.", "z", "max exact"],
            check_rows,
        ),
    )
    report.verdict = identity.verdict = verdict(curves, checks)
    report.meta = cli.run_meta(args)
    return report


def parse_args(argv: Sequence[str], results_dir: Path | str = "experiments/results") -> argparse.Namespace:
    # --task picks the defaults of the other options, so it is read first.
    task_parser = argparse.ArgumentParser(add_help=False)
    task_parser.add_argument(
        "--task",
        default="error_injection",
        choices=("error_injection", "dense_reward"),
        help="synthetic task",
    )
    task = task_parser.parse_known_args(list(argv))[0].task
    parser = cli.experiment_parser(NAME, __doc__, task, results_dir, parents=[task_parser])
    args = cli.parse_experiment_args(parser, argv, NAME, task)
    if args.task != "error_injection" and args.results == str(Path(results_dir) / f"{NAME}.md"):
        args.results = str(Path(results_dir) / f"{NAME}_{args.task}.md")
    return args


def main(argv: Sequence[str], scales: dict[str, dict], results_dir: Path | str) -> int:
    args = parse_args(argv, results_dir)
    return cli.write_report(NAME, run(args, scales["quick" if args.quick else "full"]), args.results)
