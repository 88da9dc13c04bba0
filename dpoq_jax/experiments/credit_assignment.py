"""Experiment 1: does DPO's per-token implicit reward point at the injected errors? (paper §5.1)

SFT a tiny model on the correct answers of the error_injection task, then DPO it at several β;
on held-out pairs, score each rejected response's tokens by −r_t = −β log π/π_ref and measure
  * top-1 localisation: the lowest-reward token is one of the injected ones,
  * AUROC of −r_t as a detector of injected tokens (pooled over all held-out rejected tokens),
against the reference alone (−log π_ref, surprise), the policy alone (−log π) and a uniform random
score. The verdict: does the implicit reward find the errors above chance, and as well as the
reference alone?
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.credit import score_responses
from dpoq_jax.analysis.metrics import credit_assignment_score, wilson_interval
from dpoq_jax.data.synthetic import RULES, make_task
from dpoq_jax.data.tokenize import TokenizeConfig, tokenize_pair
from dpoq_jax.experiments import cli
from dpoq_jax.train import runs

NAME = "credit_assignment"
TASK = "error_injection"
CLAIM = "DPO's per-token implicit reward localises the injected errors (credit assignment, paper §5.1)"
REF_NAME, RND_NAME = "reference alone (−log π_ref)", "uniform random"
# The rule letters of the prompts "<rule>:<digits>=" (data.synthetic.RULES), for the reader.
RULE_TEXT = {"c": "copy", "s": "sort ascending", "a": "add one to each digit, mod 10", "r": "reverse"}
assert set(RULE_TEXT) == set(RULES), "a rule was added to data.synthetic.RULES: describe it here"


def score_table_rows(
    name: str, values: Sequence[np.ndarray], errors: Sequence[Sequence[int]]
) -> list[object]:
    """[name, top-1, pooled AUROC, per-response AUROC] of per-token values where LOW means "injected"
    (implicit rewards; log-probs for the likelihood baselines), scored by analysis.metrics."""
    s = credit_assignment_score(values, errors)
    return [name, s["top1"], s["auroc_pooled"], s["auroc_mean_per_response"]]


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


def verdict(dpo: Sequence[object], reference: Sequence[object], n: int, chance: float) -> doc.Verdict:
    """Holds if DPO's top-1 is above chance (95% Wilson interval) and it is no worse than the reference
    alone in top-1 and pooled AUROC; partly if only above chance; does not hold otherwise."""
    top1, auroc = float(dpo[1]), float(dpo[2])
    ref_top1, ref_auroc = float(reference[1]), float(reference[2])
    lo, hi = wilson_interval(top1 * n, n)
    above = lo > chance
    vs_ref = top1 >= ref_top1 and auroc >= ref_auroc
    found = (
        f"DPO's lowest-reward token is an injected one in {top1:.1%} of {n} held-out responses "
        f"(95% CI {lo:.1%}–{hi:.1%}; chance {chance:.1%}), AUROC {auroc:.3f} (0.5 = no signal)"
    )
    ref = f"the reference alone scores {ref_top1:.1%} / AUROC {ref_auroc:.3f}, " + (
        "no better" if vs_ref else "better: the errors are surprising to it without DPO"
    )
    if above and vs_ref:
        status = "holds"
    elif above:
        status = "partly"
    else:
        status = "does not hold"
        found += " — not above chance"
    return doc.Verdict(CLAIM, status, f"{found}; {ref}.")


def heatmap_figure(rows: list[dict], title: str) -> doc.Figure:
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
    ax.set_xlabel("response token index (boxed: injected error)")
    fig.colorbar(im, ax=ax, label="implicit reward β log π/π_ref", shrink=0.8)
    ax.set_title(title, fontsize=10)
    return doc.Figure("heatmap", doc.fig_to_png(fig), title)


def beta_figure(rows: list[list[object]], baselines: dict[str, list[object]]) -> doc.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, col, label in ((axes[0], 2, "top-1 localisation"), (axes[1], 3, "AUROC")):
        ax.plot(betas, [r[col] for r in rows], "o-", label="DPO implicit reward")
        for (name, row), style in zip(baselines.items(), (":", "--", "-."), strict=False):
            ax.axhline(row[col - 1], ls=style, color="gray", label=name)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(betas, [str(b) for b in betas])
        ax.set_xlabel("β")
        ax.set_title(label)
    axes[1].legend(fontsize=7)
    return doc.Figure("beta_sweep", doc.fig_to_png(fig), "Credit-assignment scores against β")


def _toks(tok, ids: Sequence[int]) -> list[str]:
    return [("EOS" if int(t) == tok.eos_token_id else tok.decode([int(t)])) for t in ids]


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """Train, score, and build the report (also used by `dpoq demo`)."""
    runs.require_synthetic(args.config, args.overrides, TASK, NAME)
    task = make_task(TASK, seed=args.seed)
    tok = task.tokenizer
    doc.log(f"{NAME}: SFT reference ({scale['sft_steps']} steps) in {Path(args.workdir) / 'sft_chosen'}")
    sft_dir = runs.train_sft(args, "chosen", scale["sft_steps"])
    ref = runs.load_run_model(sft_dir)
    eval_pairs = task.preference_examples(scale["n_eval"], split="test")
    tokenized = [tokenize_pair(e, tok, TokenizeConfig()) for e in eval_pairs]
    errors = [e.meta["error_positions"] for e in eval_pairs]
    prompts = [t.prompt_ids for t in tokenized]
    rejected = [t.rejected_ids for t in tokenized]
    chosen = [t.chosen_ids for t in tokenized]
    rng = np.random.default_rng(args.seed)
    baselines: dict[str, list[object]] = {}
    beta_rows, blame_rows, per_beta, dpo_dirs = [], [], {}, {}
    for beta in scale["betas"]:
        doc.log(f"{NAME}: DPO β={beta} ({scale['dpo_steps']} steps)")
        dpo_dir = dpo_dirs[beta] = runs.train_dpo(
            args, beta, scale["dpo_steps"], sft_dir, eval_every=scale["eval_every"]
        )
        pol = runs.load_run_model(dpo_dir)
        s_rej = score_responses(pol, ref, prompts, rejected, beta)
        s_cho = score_responses(pol, ref, prompts, chosen, beta)
        if not baselines:  # the reference is the same for every β
            baselines[REF_NAME] = score_table_rows(REF_NAME, [s.ref_logps for s in s_rej], errors)
            baselines[RND_NAME] = score_table_rows(RND_NAME, [rng.random(len(s.ids)) for s in s_rej], errors)
        acc = float(np.mean([c.reward_sum > r.reward_sum for c, r in zip(s_cho, s_rej, strict=True)]))
        dpo = score_table_rows("DPO implicit reward (−r_t)", [s.rewards for s in s_rej], errors)
        policy_alone = score_table_rows("policy alone (−log π)", [s.logps for s in s_rej], errors)
        beta_rows.append([beta, acc, dpo[1], dpo[2], policy_alone[1], policy_alone[2]])
        blame_rows.append([beta, *blame_profile([s.rewards for s in s_rej], errors).values()])
        per_beta[beta] = dict(
            r_rej=[s.rewards for s in s_rej],
            r_cho=[s.rewards for s in s_cho],
            dpo=dpo,
            policy_alone=policy_alone,
            acc=acc,
        )
        doc.log(f"{NAME}: β={beta}: held-out pref. acc {acc:.3f}, top-1 {dpo[1]:.3f}, AUROC {dpo[2]:.3f}")

    main_beta = 0.1 if 0.1 in per_beta else scale["betas"][0]
    best = per_beta[main_beta]
    n_tok = sum(len(x) for x in rejected)
    n_err = sum(len(e) for e in errors)
    chance = float(np.mean([len(e) / len(x) for e, x in zip(errors, rejected, strict=True)]))
    report = doc.Report(
        "Experiment 1: per-token credit assignment on the error-injection task",
        intro=(
            "Claim (paper §5.1, from Eq. 10 and Theorem 1): the per-token log-ratio β log π/π_ref is an "
            "implicit token reward, so DPO should put low reward on exactly the tokens that make a "
            "response worse. The paper shows this qualitatively (hand-inserted errors in TL;DR "
            "summaries). Here the errors are injected at known positions, so we measure it: on held-out "
            "rejected responses, how often the lowest-reward token is an injected one (top-1), and the "
            "AUROC of −r_t as a detector of injected tokens, against the reference alone and chance."
        ),
    )
    scores = report.add(
        f"Scores at β = {main_beta}",
        f"{len(eval_pairs)} held-out pairs, {n_tok} rejected-response tokens of which {n_err} injected "
        f"(top-1 by chance ≈ {chance:.3f}). Each detector flags the tokens with the lowest value "
        "(implicit reward, or log-prob for the likelihood baselines); AUROC pooled over all tokens and "
        "averaged per response; scored by `dpoq_jax.analysis.metrics.credit_assignment_score`.",
        doc.Table(
            ["detector", "top-1 localisation", "AUROC (pooled)", "AUROC (per response)"],
            [best["dpo"], best["policy_alone"], *baselines.values()],
        ),
    )
    report.verdict = scores.verdict = verdict(best["dpo"], baselines[REF_NAME], len(eval_pairs), chance)
    report.add(
        "β sweep",
        "Held-out preference accuracy (summed implicit reward of chosen > rejected) and the "
        "credit-assignment scores of the DPO implicit reward and of the policy alone, per β.",
        doc.Table(
            ["β", "pref. accuracy", "top-1 (DPO r_t)", "AUROC (DPO r_t)", "top-1 (−log π)", "AUROC (−log π)"],
            beta_rows,
        ),
        *(
            [beta_figure([[r[0], r[1], r[2], r[3]] for r in beta_rows], baselines)]
            if len(beta_rows) > 1
            else []
        ),
    )
    report.add(
        "Where the blame goes",
        "For the DPO implicit reward of the rejected responses, per β: where the lowest-reward token sits "
        "relative to the nearest injected token (fractions of responses), and the mean implicit reward of "
        "tokens before the first error (states shared with the chosen response), of the injected tokens, "
        "and of the correct tokens after the first error (states that only rejected responses reach).",
        doc.Table(["β", *BLAME_COLUMNS], blame_rows),
    )
    rows = []
    for i in range(min(args.heatmap_pairs, len(eval_pairs))):
        p = tokenized[i]
        prompt = eval_pairs[i].prompt.removeprefix("<bos>")
        rows.append(dict(label=f"{prompt} chosen", tokens=_toks(tok, p.chosen_ids), rewards=best["r_cho"][i]))
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
        heatmap_figure(rows, f"error_injection, DPO β={main_beta}: per-token implicit reward"),
    )
    report.meta = cli.run_meta(args)
    report.run_dirs = {"sft": sft_dir, "dpo": dpo_dirs[main_beta]}
    return report


def parse_args(argv: Sequence[str], results_dir: Path | str = "experiments/results") -> argparse.Namespace:
    parser = cli.experiment_parser(NAME, __doc__, TASK, results_dir)
    parser.add_argument("--heatmap-pairs", type=int, default=4, help="pairs shown in the heatmap")
    return cli.parse_experiment_args(parser, argv, NAME, TASK)


def main(argv: Sequence[str], scales: dict[str, dict], results_dir: Path | str) -> int:
    args = parse_args(argv, results_dir)
    return cli.write_report(NAME, run(args, scales["quick" if args.quick else "full"]), args.results)
