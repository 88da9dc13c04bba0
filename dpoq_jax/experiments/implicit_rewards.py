"""Experiment 3: implicit rewards during DPO training, with and without an SFT'd reference (paper §5).

(a) reference = SFT on the chosen responses; (b) reference = the same network without that SFT (random
init). DPO from each, logging on held-out pairs every few steps the chosen and rejected implicit
rewards β Σ log π/π_ref, their margin and the chosen log-likelihood (the paper's Fig. 3). Then
checks §5 numerically on held-out prompts: for responses sampled from π_ref,
E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π) — exactly per state over the vocabulary, and by the
Monte-Carlo estimate from the sampled tokens.

    python -m dpoq_jax.experiments.implicit_rewards   # full
    python -m dpoq_jax.experiments.implicit_rewards --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.credit import response_logits, score_responses
from dpoq_jax.analysis.seeds import Items, Maximum
from dpoq_jax.analysis.stats import section54_summary
from dpoq_jax.data.errors import ErrorPolicy
from dpoq_jax.data.synthetic import make_task
from dpoq_jax.data.tokenize import TokenizeConfig, tokenize_all
from dpoq_jax.decode.sampling import sample_responses
from dpoq_jax.experiments import harness, runs
from dpoq_jax.experiments import policy_effects as pe
from dpoq_jax.train.load import load_model
from dpoq_jax.train.metrics import eval_curve
from dpoq_jax.train.setup import initial_policy

NAME = "implicit_rewards"
TASK, TASKS = "error_injection", ("error_injection", "dense_reward")
CLAIM = (
    "with an SFT'd reference the chosen responses' implicit reward falls during DPO while the margin "
    "grows, and E_{π_ref}[β log π/π_ref] = −β KL ≤ 0 (paper §5)"
)
CURVES = (
    ("rewards/chosen", "chosen implicit reward"),
    ("rewards/rejected", "rejected implicit reward"),
    ("rewards/margins", "margin (chosen − rejected)"),
    ("logps/chosen", "chosen log-likelihood"),
    ("logps/rejected", "rejected log-likelihood"),
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


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """Four checks from 95% intervals over seeds: in run (a) the chosen reward falls and the margin
    grows; it falls more than in run (b) (per-seed difference); the sampled log-ratio agrees with the
    exact −βKL (mean z over seeds within Z_LIMIT in both runs) and the exact value is never positive."""
    d_a, grow, diff = n["sft_ref/chosen_change"], n["sft_ref/margin_change"], n["a_minus_b_chosen_change"]
    z_a, z_b, mx = n["sft_ref/z"], n["no_sft_ref/z"], n["max_exact"]
    tests = [
        (
            d_a.below(0),
            f"(a) chosen reward change {d_a} ({'falls' if d_a.below(0) else 'not surely below 0'})",
        ),
        (grow.above(0), f"(a) margin change {grow} ({'grows' if grow.above(0) else 'not surely above 0'})"),
        (diff.below(0), f"(a) − (b) chosen reward change {diff}"),
        (
            abs(z_a.mean) < Z_LIMIT and abs(z_b.mean) < Z_LIMIT and mx.hi <= 1e-6,
            f"sampled vs exact −βKL z = {z_a} (a), {z_b} (b) (|z| < {Z_LIMIT:g} expected), max exact {mx}",
        ),
    ]
    status, why = doc.grade(tests)
    return {"The §5 identity on held-out prompts": doc.Verdict(CLAIM, status, why)}


def heldout_accuracy(policy, ref, task, n: int, beta: float) -> Items:
    """Preference accuracy (summed implicit reward of chosen > rejected) on n of the task's held-out
    pairs, per pair (`Items`: a bootstrap interval inside [0, 1] once merged over seeds)."""
    examples = task.preference_examples(n, split="test")  # two equal samples (dense_reward): no preference
    pairs, _ = tokenize_all(examples, task.tokenizer, TokenizeConfig(), ErrorPolicy("skip"))
    prompts = [p.prompt_ids for p in pairs]
    cho = score_responses(policy, ref, prompts, [p.chosen_ids for p in pairs], beta)
    rej = score_responses(policy, ref, prompts, [p.rejected_ids for p in pairs], beta)
    return Items.mean([c.reward_sum > r.reward_sum for c, r in zip(cho, rej, strict=True)])


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """Train (or reuse finished runs of the same settings in args.workdir), check, build the report."""
    scale = {**scale, **scale.get("per_task", {}).get(args.task, {})}  # e.g. the task's DPO regime
    if runs.at_scale(args, args.task):  # the user's configs keep their own steps, lr and eval cadence
        scale = dict(scale, sft_steps=None, dpo_steps=None, dpo_lr=None, eval_every=None)
    beta, lr = scale["beta"], scale.get("dpo_lr")
    steps = {k: scale[k] or "the config's" for k in ("sft_steps", "dpo_steps")}
    doc.log(f"{NAME}: SFT reference on chosen responses ({steps['sft_steps']} steps)")
    sft_dir = runs.train_sft(args, "chosen", scale["sft_steps"])  # (a): reference SFT'd on chosen
    # Run (a) has the settings of the credit_assignment experiment's run of the same β, so a finished
    # one there is reused rather than trained again.
    run_dirs = {}
    for name, init in (("sft_ref", sft_dir), ("no_sft_ref", None)):
        doc.log(
            f"{NAME}: DPO run {RUN_LABELS[name]} ({steps['dpo_steps']} steps, lr {lr or 'of the config'}, "
            f"β={beta})"
        )
        run_dirs[name] = runs.train_dpo(
            args, beta, scale["dpo_steps"], init, eval_every=scale["eval_every"], lr=lr
        )
    report_numbers: dict[str, float] = {}
    keys = [k for k, _ in CURVES] + ["rewards/accuracies"]
    curves = {name: eval_curve(str(d), keys) for name, d in run_dirs.items()}

    rows = []
    for name, c in curves.items():
        first, last = c[0], c[-1]
        rows.append([RUN_LABELS[name], *(x for k, _ in CURVES for x in (first[k], last[k]))])
        rows[-1].append(last["rewards/accuracies"])  # replaced below by the bootstrap-able one (synthetic)
        report_numbers[f"{name}/chosen_change"] = last["rewards/chosen"] - first["rewards/chosen"]
        report_numbers[f"{name}/margin_change"] = last["rewards/margins"] - first["rewards/margins"]
    report_numbers["a_minus_b_chosen_change"] = (
        report_numbers["sft_ref/chosen_change"] - report_numbers["no_sft_ref/chosen_change"]
    )

    check_rows, checks, gen_rows, diff_rows = [], {}, [], []
    prompts, max_new = runs.heldout_prompts(
        args.config, args.overrides, args.task, scale["n_check"], args.seed
    )
    for name, d in run_dirs.items():
        doc.log(f"{NAME}: §5 check for {RUN_LABELS[name]}")
        ref = load_model(str(sft_dir)) if name == "sft_ref" else initial_policy(d)
        pol = load_model(str(d))
        s = checks[name] = section54_check(pol, ref, prompts, beta, max_new, args.seed)
        report_numbers[f"{name}/z"] = (s["mc_mean"] - s["exact_mean"]) / max(s["diff_se"], 1e-12)
        if args.config == runs.default_config(args.task):  # a gold judge: how good are its own answers?
            task = make_task(args.task, seed=args.seed)
            rows[list(run_dirs).index(name)][-1] = heldout_accuracy(pol, ref, task, scale["n_check"], beta)
            texts = [task.tokenizer.decode(p) for p in prompts[: scale["n_gen"]]]
            if not gen_rows:
                ref_q = pe.generation_quality(load_model(str(sft_dir)), task, texts, max_new, args.seed)
                gen_rows += pe.generation_rows("reference SFT'd on chosen", ref_q)
            q = pe.generation_quality(pol, task, texts, max_new, args.seed)
            gen_rows += pe.generation_rows(f"DPO {RUN_LABELS[name]}", q)
            diff_rows += pe.difference_rows(f"DPO {RUN_LABELS[name]} − reference", q, ref_q)
        check_rows.append(
            [
                RUN_LABELS[name],
                s["responses"],
                s["tokens"],
                s["exact_mean"],
                s["mc_mean"],
                s["mc_se"],
                (s["mc_mean"] - s["exact_mean"]) / max(s["diff_se"], 1e-12),
                Maximum(s["exact_max"]),
            ]
        )

    data_name = args.task if args.config == runs.default_config(args.task) else args.config
    report = doc.Report(
        "Experiment 3: implicit rewards during DPO training",
        intro=(
            "Claim (paper §5, why implicit rewards fall during DPO): E_{a~π_ref}[β log π/π_ref] = "
            "−β KL(π_ref‖π) ≤ 0, so when the reference was fine-tuned on the chosen responses (they are "
            "then samples of π_ref), their implicit reward is expected to fall during DPO while the "
            "margin grows; without that SFT there is no such trend. "
            f"Data: {data_name}; β = {beta}; curves on held-out pairs. Run (b) starts from the SFT "
            "stage's own initialisation (random here; the base model at scale)."
        ),
    )
    report.add(
        "Training curves",
        f"First (step {scale['eval_every'] or 'of the first evaluation'}) and last held-out value of each "
        "curve (summed over the response, mean over pairs), and the final held-out preference accuracy.",
        doc.Table(
            ["run", *(f"{t} {w}" for _, t in CURVES for w in ("first", "last")), "final pref. accuracy"], rows
        ),
        curves_figure(curves),
    )
    report.add(
        "The §5 identity on held-out prompts",
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
    if gen_rows:
        report.add(
            "The policies' own answers",
            f"{min(len(prompts), scale['n_gen'])} held-out prompts; greedy = 1 beam, sampled = temperature "
            "1; gold score of the task's judge (error_injection: share of correct tokens; dense_reward: "
            "summed token reward); exact match: the whole answer right (error_injection only).",
            doc.Table(["model", "decoding", *pe.GEN_COLUMNS], gen_rows),
            doc.Table(["difference (paired, per prompt)", "decoding", *pe.GEN_COLUMNS], diff_rows),
        )
    max_exact = max(s["exact_max"] for s in checks.values())
    report.numbers = report_numbers | {"max_exact": Maximum(max_exact)}
    report.meta = harness.run_meta(args)
    return report


# ------------------------------------------------------------------------------------------ scales

# Steps, lr and eval cadence equal to experiment 1's, whose SFT and β = 0.1 runs this reuses (error_injection:
# the lr/steps its sweep chose); per_task: dense_reward keeps the config's DPO lr (1e-3) for 200 steps, a
# regime in which DPO improves its gold score over the reference (docs/experiments.md §3).
SCALES = {
    "full": dict(sft_steps=400, dpo_lr=3e-5, dpo_steps=50, beta=0.1, eval_every=25, n_check=256, n_gen=256,
                 per_task={"dense_reward": dict(dpo_lr=None, dpo_steps=200)}),
    "quick": dict(sft_steps=150, dpo_lr=None, dpo_steps=100, beta=0.1, eval_every=25, n_check=64, n_gen=32),
}  # fmt: skip


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    return harness.experiment_main(sys.modules[__name__], argv, scales, results_dir)


if __name__ == "__main__":
    sys.exit(main())
