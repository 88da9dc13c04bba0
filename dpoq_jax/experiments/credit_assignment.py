"""Experiment 1: does DPO's per-token implicit reward point at the injected errors? (paper §3)

Two settings of the error_injection task, each: SFT a tiny reference, DPO it at several β, and on
held-out pairs score each rejected response's tokens by −r_t = −β log π/π_ref:
  * fluent: an injected digit is always (correct + 5) mod 10 and the reference is SFT'd on responses
    whose digits are that alternative half of the time, so the reference finds errors and correct
    digits equally likely (checked: its own AUROC ≈ 0.5); only the preferences reveal the errors;
  * surprising: the reference is SFT'd on correct answers only, errors are random other digits, so the
    reference alone already finds them (the errors are unlikely under it).
Measured: top-1 localisation (the lowest-reward token is an injected one), AUROC of −r_t as a detector
of injected tokens (pooled and per response), where the lowest reward lands, against the reference
alone (−log π_ref), the policy alone (−log π) and a uniform random score; plus the gold quality of
greedy and sampled answers of the reference and each DPO policy, and the chosen/rejected
log-likelihoods during DPO. Verdicts come from 95% t-intervals over seeds.

    python -m dpoq_jax.experiments.credit_assignment   # full, seeds 0-4 (see the results' Run table)
    python -m dpoq_jax.experiments.credit_assignment --seeds 0-9   # more seeds
    python -m dpoq_jax.experiments.credit_assignment --sweep --seeds 0   # the lr/steps sweep, first
    python -m dpoq_jax.experiments.credit_assignment --quick   # a smoke run (2 seeds)
    python -m dpoq_jax.experiments.credit_assignment --config experiments/configs/tldr_pythia2p8b ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.credit import score_responses
from dpoq_jax.analysis.seeds import Items
from dpoq_jax.analysis.stats import auroc, top1_hit
from dpoq_jax.data.synthetic import RULES, make_task
from dpoq_jax.data.tokenize import TokenizeConfig, tokenize_pair
from dpoq_jax.experiments import harness, runs
from dpoq_jax.experiments import policy_effects as pe
from dpoq_jax.train.load import load_model

NAME = "credit_assignment"
TASK = "error_injection"
CLAIM = "DPO's per-token implicit reward localises the injected errors (credit assignment, paper §3)"
# Settings: (title, task fields). The first decides the paper's claim; runs of the second live in the
# seed's workdir itself, where experiment 3 (implicit_rewards) reuses its SFT and β = 0.1 runs.
SETTINGS = {
    "fluent": (
        "Fluent errors: the reference cannot tell them (SFT on a 50/50 mixture)",
        {"error_shift": 5, "sft_noise": 0.5},
    ),
    "surprising": ("Surprising errors: reference SFT'd on correct answers only", {}),
}
PREMISE_BAND = 0.1  # the reference "cannot solve" the task if its AUROC is within 0.5 ± this
REF_NAME, RND_NAME = "reference alone (−log π_ref)", "uniform random"
POS_NAME = "position (later = more suspicious)"


def position_values(n: int, ends_with_eos: bool) -> np.ndarray:
    """The position baseline's per-token values for a response of n tokens, LOW meaning suspicious (as
    implicit rewards): −t, so later tokens rank above earlier ones; a final EOS (which no error ever is)
    is the least suspicious, so the last content token is the top-1 (else the baseline would always
    point at EOS and score a top-1 of 0 by construction)."""
    v = -np.arange(n, dtype=np.float64)
    if ends_with_eos and n > 1:
        v[-1] = 1.0
    return v
# The rule letters of the prompts "<rule>:<digits>=" (data.synthetic.RULES), for the reader.
RULE_TEXT = {"c": "copy", "s": "sort ascending", "a": "add one to each digit, mod 10", "r": "reverse"}
assert set(RULE_TEXT) == set(RULES), "a rule was added to data.synthetic.RULES: describe it here"


def score_items(values: Sequence[np.ndarray], errors: Sequence[Sequence[int]]) -> dict[str, Items]:
    """top-1, pooled AUROC and per-response AUROC of per-token values where LOW means "injected"
    (implicit rewards; log-probs for the likelihood baselines), per held-out response (`Items`, so the
    merged report gives them bootstrap intervals over seeds and responses). Responses without an
    injected token are left out, as `analysis.stats.credit_assignment_score` does (it agrees)."""
    keep = [i for i, e in enumerate(errors) if len(e)]
    if not keep:
        raise ValueError("score_items: no response has injected error positions")
    vals = [-np.asarray(values[i], np.float64) for i in keep]
    labels = [np.isin(np.arange(len(v)), list(errors[i])) for v, i in zip(vals, keep, strict=True)]
    per_resp = [
        auroc(v, y) if 0 < y.sum() < len(y) else float("nan") for v, y in zip(vals, labels, strict=True)
    ]
    return {
        "top1": Items.mean([top1_hit(values[i], errors[i]) for i in keep]),
        "auroc": Items.auroc(vals, labels),
        "auroc_per_response": Items.mean(per_resp),
    }


def score_row(name: str, items: dict[str, Items]) -> list[object]:
    """[name, top-1, pooled AUROC, per-response AUROC] of `score_items`."""
    return [name, items["top1"], items["auroc"], items["auroc_per_response"]]


BLAME_COLUMNS = (
    "argmin −1",
    "argmin on error",
    "argmin +1",
    "argmin +2",
    "argmin ≥ +3",
    "r before first error",
    "r on errors",
    "r after first error",
)


def blame_profile(rewards: Sequence[np.ndarray], errors: Sequence[Sequence[int]]) -> dict[str, float]:
    """Where the lowest reward falls relative to the injected tokens, and mean rewards by region.

    offset: argmin index minus the nearest injected index (0 = on an error, +1 = the token after);
    regions: tokens before the first error (their states are shared with the chosen response),
    injected tokens, and correct tokens after the first error (states only rejected responses reach).
    """
    offsets, before, on, after = [], [], [], []
    for r, e in zip(rewards, errors, strict=True):
        r = np.asarray(r, np.float64)
        a = int(np.argmin(r))
        offsets.append(min((a - x for x in e), key=abs))
        first, err = min(e), set(e)
        before += list(r[:first])
        on += [r[i] for i in e]
        after += [r[i] for i in range(first + 1, len(r)) if i not in err]
    off = np.array(offsets)
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    values = [np.mean(off == -1), np.mean(off == 0), np.mean(off == 1), np.mean(off == 2), np.mean(off >= 3)]
    values += [mean(before), mean(on), mean(after)]
    return dict(zip(BLAME_COLUMNS, (float(v) for v in values), strict=True))


ANSWERS_CLAIM = "DPO (the sweep's lr/steps) improves the gold score of the policy's own greedy answers"


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """The rules of docs/experiments.md §1 (rewritten 2026-12-07, before any rerun), from the intervals
    (the wider of seed-t and the two-level bootstrap, seeds.wider_interval).

    Credit assignment, per setting at the main β, on paired differences over the same held-out
    responses: DPO's implicit reward against the two baselines a skeptic starts from, the reference
    alone (−log π_ref) and the position (later = more suspicious). Holds if DPO − reference and
    DPO − position lie above 0 for both the pooled AUROC and the top-1 localisation; partly if they do
    for one of the two metrics (or all four do but the fluent setting's premise, reference AUROC within
    0.5 ± 0.1, fails); does not hold otherwise: beating chance alone no longer earns "partly". The
    policies' answers, per setting at the main β: holds if the paired difference of greedy gold score
    DPO − reference lies above 0, does not hold otherwise. An lr/steps sweep alone (`--sweep`) has no
    verdicts."""
    out, answers = {}, {}
    if "sweep/choice" in n:
        return out
    for setting, betas in settings_of(scale).items():
        b = main_beta(betas)
        k = f"{setting}/beta{b}"
        top1, auroc_ = n[f"{k}/dpo_top1"], n[f"{k}/dpo_auroc"]
        ref_auroc, chance = n[f"{setting}/ref_auroc"], n[f"{setting}/chance"]
        diffs = {(metric, base): n[f"{k}/dpo_minus_{base}_{metric}"]
                 for metric in ("auroc", "top1") for base in ("ref", "pos")}  # fmt: skip
        beats = {m: diffs[(m, "ref")].above(0) and diffs[(m, "pos")].above(0) for m in ("auroc", "top1")}
        why = (
            f"at β = {b}, DPO's pooled AUROC {auroc_}, top-1 {top1} (chance {chance.mean:.3f}); the "
            f"reference alone: AUROC {ref_auroc}, top-1 {n[f'{setting}/ref_top1']}; the position: AUROC "
            f"{n[f'{setting}/pos_auroc']}, top-1 {n[f'{setting}/pos_top1']}; paired DPO − reference: AUROC "
            f"{diffs[('auroc', 'ref')]}, top-1 {diffs[('top1', 'ref')]}; DPO − position: AUROC "
            f"{diffs[('auroc', 'pos')]}, top-1 {diffs[('top1', 'pos')]}"
        )
        if beats["auroc"] and beats["top1"]:
            status, why = "holds", why + ": the implicit reward finds the errors better than both baselines"
        elif beats["auroc"] or beats["top1"]:
            status = "partly"
            why += f": above both baselines on {'AUROC' if beats['auroc'] else 'top-1'} only"
        else:
            status, why = "does not hold", why + ": not surely above both baselines on either metric"
        if setting == "fluent":
            premise = abs(ref_auroc.mean - 0.5) < PREMISE_BAND
            why += (
                f"; premise {'met' if premise else 'NOT met'} (reference AUROC {ref_auroc}, "
                f"needed within 0.5 ± {PREMISE_BAND})"
            )
            if not premise and status == "holds":
                status = "partly"
        out[SETTINGS[setting][0]] = doc.Verdict(CLAIM, status, why + ".")
        gold = n.get(f"{k}/greedy_gold_diff")
        if gold is not None:
            better = gold.above(0)
            answers[answers_title(setting)] = doc.Verdict(
                ANSWERS_CLAIM,
                "holds" if better else "does not hold",
                f"at β = {b}, greedy gold score DPO − reference (paired, per prompt) {gold}"
                + ("" if better else (" (worse)" if gold.below(0) else " (not surely above 0)"))
                + f"; reference {n[f'{setting}/ref_greedy_gold']}.",
            )
    return out | answers


def answers_title(setting: str) -> str:
    return f"The policies' own answers ({setting} errors)"


def settings_of(scale: dict) -> dict[str, tuple[float, ...]]:
    """{setting: its β values}: scale["settings"] if given, else every setting at scale["betas"]."""
    return dict(scale.get("settings") or {s: tuple(scale["betas"]) for s in SETTINGS})


def main_beta(betas: Sequence[float]) -> float:
    return 0.1 if 0.1 in betas else betas[0]


def heatmap_figure(
    rows: list[dict], title: str, xlabel: str = "response token index (boxed: injected error)"
) -> doc.Figure:
    """Per-token implicit rewards of a few pairs: chosen and rejected lines, injected tokens boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    R = max(len(r["tokens"]) for r in rows)
    vals = np.full((len(rows), R), np.nan)
    for i, r in enumerate(rows):
        vals[i, : len(r["rewards"])] = r["rewards"]
    lim = float(np.nanmax(np.abs(vals))) or 1.0
    fig, ax = plt.subplots(figsize=(0.45 * R + 3.2, 0.42 * len(rows) + 1.2))
    im = ax.imshow(np.ma.masked_invalid(vals), cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i, r in enumerate(rows):
        for t, tok in enumerate(r["tokens"]):
            colour = doc.text_colour(im.cmap(im.norm(vals[i, t])))  # white digits on dark cells
            ax.text(
                t,
                i,
                tok,
                ha="center",
                va="center",
                fontsize=8 if len(tok) == 1 else 6,
                family="monospace",
                color=colour,
            )
        for t in r.get("errors", ()):
            ax.add_patch(Rectangle((t - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2))
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=8, family="monospace")
    ax.set_xticks(range(R), [str(t) for t in range(R)], fontsize=7)
    ax.set_xlabel(xlabel)
    fig.colorbar(im, ax=ax, label="implicit reward β log π/π_ref", shrink=0.8)
    ax.set_title(title, fontsize=10)
    return doc.Figure("heatmap", doc.fig_to_png(fig), title)


def beta_figure(rows: list[list[object]], baselines: dict[str, list[object]], name: str) -> doc.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, col, label in ((axes[0], 2, "top-1 localisation"), (axes[1], 3, "AUROC")):
        ax.plot(betas, [float(r[col]) for r in rows], "o-", label="DPO implicit reward")
        for (label_, row), style in zip(baselines.items(), (":", "--", "-."), strict=False):
            ax.axhline(float(row[col - 1]), ls=style, color="gray", label=label_)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(betas, [str(b) for b in betas])
        ax.set_xlabel("β")
        ax.set_title(label)
    axes[1].legend(fontsize=7)
    return doc.Figure(name, doc.fig_to_png(fig), "Credit-assignment scores against β")


def _toks(tok, ids: Sequence[int]) -> list[str]:
    return [("EOS" if int(t) == tok.eos_token_id else tok.decode([int(t)])) for t in ids]


GEN_NOTE = (
    "held-out prompts; greedy = 1 beam, sampled = temperature 1. Gold score: share of correct tokens "
    "(EOS included); exact match: the whole answer right."
)


def regime(scale: dict) -> tuple[float | None, int]:
    """(DPO lr, steps) of the experiment's runs: the scale's (the sweep's choice), lr None = the config's."""
    return scale.get("dpo_lr"), scale["dpo_steps"]


def run_setting(args: argparse.Namespace, scale: dict, setting: str, report: doc.Report) -> dict:
    """One setting of one seed: train, score, add its sections to `report`; returns numbers."""
    title, kwargs = SETTINGS[setting]
    a = argparse.Namespace(**{**vars(args), "task_kwargs": kwargs})
    if setting != "surprising":
        a.workdir = str(Path(args.workdir) / setting)
    task = make_task(TASK, seed=args.seed, **kwargs)
    tok = task.tokenizer
    doc.log(
        f"{NAME} [{setting}]: SFT reference ({scale['sft_steps']} steps) in {Path(a.workdir) / 'sft_chosen'}"
    )
    sft_dir = runs.train_sft(a, "chosen", scale["sft_steps"])
    ref = load_model(str(sft_dir))
    eval_pairs = task.preference_examples(scale["n_eval"], split="test")
    tokenized = [tokenize_pair(e, tok, TokenizeConfig()) for e in eval_pairs]
    errors = [e.meta["error_positions"] for e in eval_pairs]
    prompts = [t.prompt_ids for t in tokenized]
    rejected = [t.rejected_ids for t in tokenized]
    chosen = [t.chosen_ids for t in tokenized]
    gen_prompts = [e.prompt for e in eval_pairs[: scale["n_gen"]]]
    max_new = task.max_digits + 1
    rng = np.random.default_rng(args.seed)
    numbers: dict[str, object] = {}
    baselines: dict[str, list[object]] = {}
    beta_rows, blame_rows, traj_rows, per_beta, dpo_dirs, curves = [], [], [], {}, {}, {}
    ref_q = pe.generation_quality(ref, task, gen_prompts, max_new, args.seed)
    gen_rows, diff_rows = pe.generation_rows("reference (SFT)", ref_q), []
    numbers["ref_greedy_exact"] = ref_q["greedy"]["exact match"]
    numbers["ref_greedy_gold"] = ref_q["greedy"]["gold score"]
    betas = settings_of(scale)[setting]
    lr, steps = regime(scale)
    for beta in betas:
        doc.log(f"{NAME} [{setting}]: DPO β={beta} ({steps} steps, lr {lr or 'of the config'})")
        dpo_dir = dpo_dirs[beta] = runs.train_dpo(
            a, beta, steps, sft_dir, eval_every=scale["eval_every"], lr=lr
        )
        pol = load_model(str(dpo_dir))
        s_rej = score_responses(pol, ref, prompts, rejected, beta)
        s_cho = score_responses(pol, ref, prompts, chosen, beta)
        if not baselines:  # the reference is the same for every β
            ref_items = score_items([s.ref_logps for s in s_rej], errors)
            baselines[REF_NAME] = score_row(REF_NAME, ref_items)
            baselines[RND_NAME] = score_row(
                RND_NAME, score_items([rng.random(len(s.ids)) for s in s_rej], errors)
            )
            eos = tok.eos_token_id
            pos_items = score_items([position_values(len(s.ids), s.ids[-1] == eos) for s in s_rej], errors)
            baselines[POS_NAME] = score_row(POS_NAME, pos_items)
        acc = Items.mean([c.reward_sum > r.reward_sum for c, r in zip(s_cho, s_rej, strict=True)])
        dpo_items = score_items([s.rewards for s in s_rej], errors)
        pol_items = score_items([s.logps for s in s_rej], errors)
        dpo, policy_alone = score_row("DPO implicit reward (−r_t)", dpo_items), score_row(
            "policy alone (−log π)", pol_items
        )
        beta_rows.append([beta, acc, dpo[1], dpo[2], dpo[3], policy_alone[1], policy_alone[2]])
        blame_rows.append([beta, *blame_profile([s.rewards for s in s_rej], errors).values()])
        q = pe.generation_quality(pol, task, gen_prompts, max_new, args.seed)
        gen_rows += pe.generation_rows(f"DPO β={beta}", q)
        diff_rows += pe.difference_rows(f"DPO β={beta} − reference", q, ref_q)
        curves[f"β={beta}"], traj = pe.trajectory(dpo_dir)
        traj_rows.append([beta, *traj.values()])
        per_beta[beta] = dict(
            r_rej=[s.rewards for s in s_rej],
            r_cho=[s.rewards for s in s_cho],
            dpo=dpo,
            policy_alone=policy_alone,
            ref_diff=score_row("DPO implicit reward − reference alone (paired)",
                               {k: dpo_items[k] - ref_items[k] for k in dpo_items}),
            pos_diff=score_row("DPO implicit reward − position (paired)",
                               {k: dpo_items[k] - pos_items[k] for k in dpo_items}),
        )  # fmt: skip
        k = f"beta{beta}"
        numbers |= {
            f"{k}/dpo_top1": dpo_items["top1"],
            f"{k}/dpo_auroc": dpo_items["auroc"],
            f"{k}/dpo_minus_ref_auroc": dpo_items["auroc"] - ref_items["auroc"],
            f"{k}/dpo_minus_pos_auroc": dpo_items["auroc"] - pos_items["auroc"],
            f"{k}/dpo_minus_ref_top1": dpo_items["top1"] - ref_items["top1"],
            f"{k}/dpo_minus_pos_top1": dpo_items["top1"] - pos_items["top1"],
            f"{k}/policy_auroc": pol_items["auroc"],
            f"{k}/greedy_exact": q["greedy"]["exact match"],
            f"{k}/greedy_gold_diff": q["greedy"]["gold score"] - ref_q["greedy"]["gold score"],
            f"{k}/sampled_gold_diff": q["sampled"]["gold score"] - ref_q["sampled"]["gold score"],
        }
        doc.log(
            f"{NAME} [{setting}]: β={beta}: pref. acc {acc}, top-1 {dpo[1]}, AUROC {dpo[2]}, greedy gold "
            f"{q['greedy']['gold score']} (reference {ref_q['greedy']['gold score']})"
        )

    b = main_beta(betas)
    best = per_beta[b]
    n_tok = sum(len(x) for x in rejected)
    n_err = sum(len(e) for e in errors)
    chance = Items.mean([len(e) / len(x) for e, x in zip(errors, rejected, strict=True) if len(e)])
    numbers |= {
        "ref_top1": ref_items["top1"],
        "ref_auroc": ref_items["auroc"],
        "chance": chance,
        "random_top1": baselines[RND_NAME][1],
        "pos_top1": pos_items["top1"],
        "pos_auroc": pos_items["auroc"],
    }
    report.add(
        title,
        (
            "Reference SFT'd on responses whose digits are each replaced, with probability 0.5, by the "
            "fluent alternative (correct + 5) mod 10; injected errors are that alternative. The reference "
            "sees an error as often as the correct digit, so only the preference data can reveal the errors."
            if setting == "fluent"
            else "Reference SFT'd on correct answers only; injected errors are random other digits, which "
            "the reference finds unlikely: the reference alone localises them."
        ),
    )
    report.add(
        f"Scores at β = {b}",
        f"{len(eval_pairs)} held-out pairs, {n_tok} rejected-response tokens of which {n_err} injected "
        f"(top-1 by chance ≈ {float(chance):.3f}; seed {args.seed}). Each detector flags the tokens with the "
        "lowest value (implicit reward, or log-prob for the likelihood baselines); AUROC pooled over all "
        "tokens and averaged per response; the last rows are the paired differences DPO − reference alone "
        "and DPO − position on the same responses. The reference alone's AUROC tests the setting's premise.",
        doc.Table(
            ["detector", "top-1 localisation", "AUROC (pooled)", "AUROC (per response)"],
            [best["dpo"], best["policy_alone"], *baselines.values(), best["ref_diff"], best["pos_diff"]],
        ),
        level=2,
    )
    report.add(
        "β sweep",
        "Held-out preference accuracy (summed implicit reward of chosen > rejected) and the "
        "credit-assignment scores of the DPO implicit reward and of the policy alone, per β.",
        doc.Table(
            [
                "β",
                "pref. accuracy",
                "top-1 (DPO r_t)",
                "AUROC (DPO r_t)",
                "AUROC per resp. (DPO r_t)",
                "top-1 (−log π)",
                "AUROC (−log π)",
            ],
            beta_rows,
        ),
        *(
            [beta_figure([[r[0], r[1], r[2], r[3]] for r in beta_rows], baselines, f"beta_sweep_{setting}")]
            if len(beta_rows) > 1
            else []
        ),
        level=2,
    )
    report.add(
        "Where the blame goes",
        "For the DPO implicit reward of the rejected responses, per β: where the lowest-reward token sits "
        "relative to the nearest injected token (fractions of responses), and the mean implicit reward of "
        "tokens before the first error (states shared with the chosen response), of the injected tokens, "
        "and of the correct tokens after the first error (states that only rejected responses reach).",
        doc.Table(["β", *BLAME_COLUMNS], blame_rows),
        level=2,
    )
    report.add(
        answers_title(setting),
        f"{len(gen_prompts)} {GEN_NOTE} DPO lr {lr or 'of the config'}, {steps} steps (the sweep's choice, "
        "docs/experiments.md). The second table: per-prompt paired differences DPO − reference.",
        doc.Table(["model", "decoding", *pe.GEN_COLUMNS], gen_rows),
        doc.Table(["difference", "decoding", *pe.GEN_COLUMNS], diff_rows),
        level=2,
    )
    report.add(
        "Chosen and rejected log-likelihood during DPO",
        "Held-out mean summed log π(y|x) of the chosen and rejected responses at the first and last "
        "evaluation of each DPO run, and the last implicit-reward margin.",
        doc.Table(["β", *pe.TRAJ_COLUMNS], traj_rows),
        pe.trajectory_figure(curves, f"loglik_{setting}", f"{setting} errors: held-out log-likelihoods"),
        level=2,
    )
    if setting == "fluent" or "fluent" not in settings_of(scale):
        rows = []
        for i in range(min(args.heatmap_pairs, len(eval_pairs))):
            p = tokenized[i]
            prompt = eval_pairs[i].prompt.removeprefix("<bos>")
            rows.append(
                dict(label=f"{prompt} chosen", tokens=_toks(tok, p.chosen_ids), rewards=best["r_cho"][i])
            )
            rows.append(
                dict(
                    label=f"{prompt} rejected",
                    tokens=_toks(tok, p.rejected_ids),
                    rewards=best["r_rej"][i],
                    errors=errors[i],
                )
            )
        codes = "; ".join(f"`{k}:` {v}" for k, v in RULE_TEXT.items())
        report.add(
            "Heatmap",
            "Per-token implicit rewards β log π/π_ref of the first held-out pairs; red is negative, blue "
            "positive; injected tokens are boxed. Each row is labelled with its prompt `rule:digits=` and "
            f"the response shown. Rules: {codes}. The correct answer is the "
            "rule applied to the digits, e.g. `r:123=` → `321`.",
            heatmap_figure(rows, f"error_injection ({setting}), DPO β={b}: per-token implicit reward"),
            level=2,
        )
    report.run_dirs = report.run_dirs or {"sft": sft_dir, "dpo": dpo_dirs[b]}
    return {f"{setting}/{k}": v for k, v in numbers.items()}


SWEEP_TITLE = "DPO lr/steps sweep (validation prompts)"


def run_sweep(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed's lr/steps sweep at the main β, on validation prompts (never the test ones): per setting
    and (lr, steps) the greedy gold score of the DPO policy and its paired difference from the reference,
    held-out preference accuracy and the AUROC of −r_t; the choice by the rule of docs/experiments.md."""
    rows, by_regime = [], {}
    for setting, betas in settings_of(scale).items():
        _, kwargs = SETTINGS[setting]
        a = argparse.Namespace(**{**vars(args), "task_kwargs": kwargs})
        if setting != "surprising":
            a.workdir = str(Path(args.workdir) / setting)
        task = make_task(TASK, seed=args.seed, **kwargs)
        sft_dir = runs.train_sft(a, "chosen", scale["sft_steps"])
        ref = load_model(str(sft_dir))
        pairs = task.preference_examples(scale["n_eval"], split="validation")
        tokenized = [tokenize_pair(e, task.tokenizer, TokenizeConfig()) for e in pairs]
        errors = [e.meta["error_positions"] for e in pairs]
        prompts = [t.prompt_ids for t in tokenized]
        gen_prompts = [e.prompt for e in pairs[: scale["n_gen"]]]
        ref_q = pe.generation_quality(ref, task, gen_prompts, task.max_digits + 1, args.seed)
        greedy = ref_q["greedy"]
        rows.append([setting, "reference", "", greedy["gold score"], "", greedy["exact match"], "", ""])
        beta = main_beta(betas)
        for lr, steps in scale["sweep"]:
            doc.log(f"{NAME} sweep [{setting}]: DPO β={beta} lr {lr:g} {steps} steps")
            d = runs.train_dpo(a, beta, steps, sft_dir, eval_every=scale["eval_every"], lr=lr)
            pol = load_model(str(d))
            s_rej = score_responses(pol, ref, prompts, [t.rejected_ids for t in tokenized], beta)
            s_cho = score_responses(pol, ref, prompts, [t.chosen_ids for t in tokenized], beta)
            acc = Items.mean([c.reward_sum > r.reward_sum for c, r in zip(s_cho, s_rej, strict=True)])
            q = pe.generation_quality(pol, task, gen_prompts, task.max_digits + 1, args.seed)
            diff = q["greedy"]["gold score"] - ref_q["greedy"]["gold score"]
            by_regime.setdefault((lr, steps), []).append(float(diff))
            rows.append([setting, lr, steps, q["greedy"]["gold score"], diff, q["greedy"]["exact match"], acc,
                         score_items([s.rewards for s in s_rej], errors)["auroc"]])  # fmt: skip
    choice = choose_regime(by_regime)
    choice_rows = [[lr, st, float(np.mean(d)), *d] for (lr, st), d in by_regime.items()]
    report = doc.Report(
        "Experiment 1: the DPO lr/steps sweep",
        intro=(
            "Before the five seeds, one seed's sweep of the DPO learning rate and steps at β = "
            f"{main_beta(next(iter(settings_of(scale).values())))} in both settings, scored on validation "
            "prompts (the test prompts are the experiment's). The rule (docs/experiments.md §1, written "
            "before the sweep ran): take the (lr, steps) with the largest mean over the settings of the "
            "greedy gold-score difference DPO − reference; ties go to fewer steps, then the smaller lr."
        ),
    )
    report.add(
        SWEEP_TITLE,
        f"{scale['n_gen']} validation prompts for the answers, {scale['n_eval']} validation pairs for the "
        "preference accuracy and the AUROC of −r_t (pooled). Intervals: this seed's prompts resampled.",
        doc.Table(["setting", "lr", "steps", "greedy gold", "DPO − reference", "greedy exact match",
                   "pref. accuracy", "AUROC (−r_t)"], rows),  # fmt: skip
        doc.Table(["lr", "steps", "mean difference", *(f"{s} difference" for s in settings_of(scale))],
                  choice_rows),  # fmt: skip
        f"**Choice by the rule: lr {choice[0]:g}, {choice[1]} steps** (mean greedy gold difference "
        f"{np.mean(by_regime[choice]):+.3f}; "
        + ("it improves on the reference in every setting)." if min(by_regime[choice]) > 0
           else "no regime improves on the reference in every setting).")  # fmt: skip
    )
    report.numbers = {"sweep/choice": float(list(by_regime).index(choice))}
    report.meta = harness.run_meta(args)
    return report


def choose_regime(by_regime: dict[tuple[float, int], list[float]]) -> tuple[float, int]:
    """The sweep's rule: the largest mean difference; ties to fewer steps, then the smaller lr."""
    return min(by_regime, key=lambda r: (-round(float(np.mean(by_regime[r])), 12), r[1], r[0]))


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: every setting trained, scored and reported (also used by `dpoq demo`)."""
    runs.require_synthetic(args.config, args.overrides, TASK, NAME)
    if getattr(args, "sweep", False):
        return run_sweep(args, scale)
    report = doc.Report(
        "Experiment 1: per-token credit assignment on the error-injection task",
        intro=(
            "Claim (paper §3, from Eq. 10 and Theorem 1): the per-token log-ratio β log π/π_ref is an "
            "implicit token reward, so DPO should put low reward on exactly the tokens that make a "
            "response worse. The paper shows this qualitatively (hand-inserted errors in TL;DR "
            "summaries). Here the errors are injected at known positions, so we measure it: on held-out "
            "rejected responses, how often the lowest-reward token is an injected one (top-1), and the "
            "AUROC of −r_t as a detector of injected tokens, against the reference alone and chance. "
            "The fluent setting decides the claim: there the reference cannot find the errors, so "
            "whatever the implicit reward finds it learned from the preferences."
        ),
    )
    for setting in settings_of(scale):
        report.numbers |= run_setting(args, scale, setting, report)
    report.meta = harness.run_meta(args)
    return report


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heatmap-pairs", type=int, default=4, help="pairs shown in the heatmap")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="instead of the experiment: the DPO lr/steps sweep of the scale on validation prompts (run it "
        "first, with one seed; its default results file is credit_assignment_sweep.md)",
    )


# ------------------------------------------------------------------------------------------ scales

# dpo_lr / dpo_steps: the DPO regime of every β, chosen by the sweep (`--sweep --seeds 0`, validation
# prompts, rule in docs/experiments.md §1); settings: β values per setting (fluent errors: the β sweep;
# surprising errors: the β = 0.1 run that experiment 3 shares); n_eval held-out pairs scored; n_gen
# prompts generated; sweep: the (lr, steps) grid.
SWEEP = tuple((lr, steps) for lr in (3e-5, 1e-4, 3e-4, 1e-3) for steps in (50, 100, 200, 400))
SCALES = {
    "full": dict(
        sft_steps=400,
        # the sweep's choice (results/credit_assignment_sweep.md): no regime improves the greedy gold
        # score in both settings; this one changes it least (mean −0.001)
        dpo_lr=3e-5,
        dpo_steps=50,
        settings={"fluent": (0.03, 0.1, 0.3), "surprising": (0.1,)},
        n_eval=512,
        n_gen=256,
        eval_every=25,
        sweep=SWEEP,
    ),
    "quick": dict(
        sft_steps=150,
        dpo_lr=None,
        dpo_steps=100,
        settings={"fluent": (0.1,), "surprising": (0.1,)},
        n_eval=64,
        n_gen=32,
        eval_every=25,
        sweep=((3e-4, 50), (1e-3, 100)),
    ),
}


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    argv, scales = harness.with_defaults(sys.modules[__name__], argv, scales)
    module = sys.modules[__name__]
    args = harness.parse_args(module, argv, results_dir)
    if args.sweep and args.results == str(Path(results_dir) / f"{NAME}.md"):
        args.results = str(Path(results_dir) / f"{NAME}_sweep.md")
    scale = scales["quick" if args.quick else "full"]
    report = harness.run_seeds(module.run, module.verdicts, args, scale)
    return harness.write_report(NAME, report, args.results)


if __name__ == "__main__":
    sys.exit(main())
