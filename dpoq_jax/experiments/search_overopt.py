"""Experiment 2: likelihood search on a DPO policy is reward search, and it over-optimises (paper §4).

On the dense_reward task with a length-neutral gold judge (the known summed token reward, no length
bonus or penalty), SFT a reference on all responses, then DPO it at several β on preferences from two
labellers: the gold judge itself (Bradley–Terry on the gold reward) and a length-biased one (gold
reward + λ·length, the bias TL;DR labellers are said to have). Decode held-out prompts with beam
search at several widths and by sampling (T = 1); report the gold win rate against the reference's
own samples (ties count half), mean gold reward and mean length, for the reference and each policy.
Does the paper's pattern (a few beams beat one, many beams give longer, worse answers) appear with
the bias and not without? Verdicts from 95% t-intervals over seeds of per-seed differences.

    python -m dpoq_jax.experiments.search_overopt   # full: seeds 0-4, two labellers, β 0.1 and 1.0
    python -m dpoq_jax.experiments.search_overopt --quick   # a smoke run (2 seeds)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.seeds import Items
from dpoq_jax.data.synthetic import make_task
from dpoq_jax.decode.beam import best_beams
from dpoq_jax.decode.core import strip_eos
from dpoq_jax.decode.sampling import sample_responses
from dpoq_jax.experiments import harness, runs
from dpoq_jax.experiments import policy_effects as pe
from dpoq_jax.train.load import load_model

NAME = "search_overopt"
TASK = "dense_reward"
CLAIM = (
    "beam search on a DPO policy is reward search: a few beams beat one, and many beams over-optimise "
    "(worse, longer responses) (paper §4)"
)
LENGTH_BIAS = 0.3  # λ per letter; two reference samples differ by ~6 letters, i.e. ~1.8 nats of preference
GOLD = {"bonus": 0.0, "length_penalty": 0.0}  # a length-neutral gold judge: the summed W only
SETTINGS = {
    "unbiased": ("Labels from the gold judge (no length bias)", {}),
    "biased": (
        f"Labels with a length bias (gold + {LENGTH_BIAS}·length)",
        {"label_length_bias": LENGTH_BIAS},
    ),
}


def win_rate(gen_scores: np.ndarray, ref_scores: np.ndarray) -> float:
    """Gold-judge win rate of generations against reference responses; ties count half."""
    gen_scores, ref_scores = np.asarray(gen_scores, np.float64), np.asarray(ref_scores, np.float64)
    return float(np.mean(wins(gen_scores, ref_scores)))


def wins(gen_scores: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """Per prompt: 1 if the generation's gold score beats the reference response's, ½ on a tie, else 0."""
    g, r = np.asarray(gen_scores, np.float64), np.asarray(ref_scores, np.float64)
    if g.shape != r.shape or g.size == 0:
        raise ValueError(f"wins: shapes {g.shape} and {r.shape} must match and be non-empty")
    return (g > r) + 0.5 * (g == r)


def curves_figure(
    results: dict[float, dict[str, dict]], beams: Sequence[int], ref_len: float, name: str, title: str
) -> doc.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for beta, per in results.items():
        xs = list(beams)
        st = [per[f"beam {b}"] for b in beams]
        (line,) = axes[0].plot(xs, [float(s["win_rate"]) for s in st], "o-", label=f"β={beta}")
        color = line.get_color()
        if "sample" in per:
            axes[0].axhline(float(per["sample"]["win_rate"]), color=color, ls=":", lw=1)
        axes[1].plot(xs, [float(s["gold"]) for s in st], "o-", color=color, label=f"β={beta}")
        axes[2].plot(xs, [float(s["length"]) for s in st], "o-", color=color, label=f"β={beta}")
    axes[0].set_title("gold win rate vs reference samples\n(dotted: sampling T=1)", fontsize=9)
    axes[1].set_title("mean gold reward", fontsize=9)
    axes[2].set_title("mean length (letters)", fontsize=9)
    axes[2].axhline(ref_len, color="gray", ls="--", lw=1, label="reference samples")
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(beams), [str(b) for b in beams])
        ax.set_xlabel("beams")
    axes[2].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return doc.Figure(name, doc.fig_to_png(fig), f"{title}: win rate, gold reward and length against beams")


def pattern_checks(
    n: dict, setting: str, betas: Sequence[float], beams: Sequence[int]
) -> list[tuple[bool, str]]:
    """The paper's pattern, per β, each from a 95% interval of a per-seed difference: a few beams beat
    one (win rate at 5 beams, or the widest ≤ 5, minus 1 beam > 0); the widest search is worse than
    5 beams (gold reward at 5 minus at the widest > 0); and longer than 1 beam (length difference > 0)."""
    few, wide = max(b for b in beams if b <= 5), beams[-1]
    out = []
    for beta in betas:
        k = f"{setting}/beta{beta}"
        gain, drop, longer = n[f"{k}/gain_few"], n[f"{k}/drop_wide"], n[f"{k}/longer_wide"]
        out.append((gain.above(0), f"β={beta}: {few} beams − 1 beam win rate {gain}"))
        if wide > few:
            out.append((drop.above(0), f"gold at {few} − at {wide} beams {drop}"))
        out.append((longer.above(0), f"length at {wide} − at 1 beam {longer} letters"))
    return out


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """Per labeller: holds if every check of `pattern_checks` passes for every β, does not hold if
    none does. Overall (with vs without the bias): holds if the biased labeller shows more checks
    passing than the unbiased one and the widest beams are longer only with the bias."""
    out, passed = {}, {}
    settings = scale.get("settings", tuple(SETTINGS))
    for setting in settings:
        checks = pattern_checks(n, setting, scale["betas"], scale["beams"])
        status, why = doc.grade(checks)
        sample_win = {b: n.get(f"{setting}/beta{b}/sample_win") for b in scale["betas"]}
        if all(w is not None for w in sample_win.values()):  # the regime: does DPO improve on the reference?
            wins_text = ", ".join(
                f"{w} at β={b}" + ("" if w.above(0.5) else " (not surely above 0.5)")
                for b, w in sample_win.items()
            )
            why += f" Regime check (not graded): DPO's samples against the reference's, win rate {wins_text}."
        passed[setting] = sum(ok for ok, _ in checks), len(checks)
        out[SETTINGS[setting][0]] = doc.Verdict(CLAIM, status, why)
    if len(settings) == 2:
        (pu, nu), (pb, nb) = passed["unbiased"], passed["biased"]
        longer = {s: all(n[f"{s}/beta{b}/longer_wide"].above(0) for b in scale["betas"]) for s in settings}
        ok = pb > pu and longer["biased"] and not longer["unbiased"]
        some = pb > pu or (longer["biased"] and not longer["unbiased"])
        why = (
            f"checks of the paper's pattern passed: {pb}/{nb} with the length-biased labeller, {pu}/{nu} "
            f"without; widest beams longer than 1 beam at every β: with bias {longer['biased']}, "
            f"without {longer['unbiased']}"
        )
        status = "holds" if ok else "partly" if some else "does not hold"
        claim = "the paper's over-optimisation pattern comes from the labeller's length bias"
        out = {"With and without the length bias": doc.Verdict(claim, status, why + "."), **out}
    return out


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: SFT, DPO per labeller and β, decoding at every width; numbers for the verdicts."""
    runs.require_synthetic(args.config, args.overrides, TASK, NAME)
    args = argparse.Namespace(**{**vars(args), "task_kwargs": GOLD})
    task = make_task(TASK, seed=args.seed, **GOLD)
    tok = task.tokenizer
    doc.log(f"{NAME}: SFT reference on all responses ({scale['sft_steps']} steps)")
    sft_dir = runs.train_sft(args, "all", scale["sft_steps"])
    ref = load_model(str(sft_dir))
    pairs = task.preference_examples(scale["n_prompts"], split="test")
    prompts = [tok.encode(p.prompt) for p in pairs]
    max_new = task.max_len + 1

    def decode(model, b: int | None) -> tuple[np.ndarray, np.ndarray]:
        if b is None:
            outs = sample_responses(model, prompts, max_new_tokens=max_new, seed=args.seed + 1)
        else:
            outs = best_beams(model, prompts, num_beams=b, max_new_tokens=max_new)
        gold = np.array([task.gold_score(p.prompt, o) for p, o in zip(pairs, outs, strict=True)])
        return gold, np.array([len(strip_eos(o, tok.eos_token_id)) for o in outs], np.float64)

    # The opponent: the reference's own samples (seed args.seed, not the policies' sampling seed).
    ref_outs = sample_responses(ref, prompts, max_new_tokens=max_new, seed=args.seed)
    ref_gold = np.array([task.gold_score(p.prompt, o) for p, o in zip(pairs, ref_outs, strict=True)])
    ref_len = float(np.mean([len(strip_eos(o, tok.eos_token_id)) for o in ref_outs]))
    report = doc.Report(
        "Experiment 2: beam search on DPO policies — reward search and over-optimisation",
        intro=(
            "Claim (paper §4, search equals likelihood): maximising the KL-regularised reward over a "
            "sequence equals maximising its likelihood under the DPO policy, so beam search is reward "
            "search; the paper reports that 5 beams beat 1 beam by about 10–15% GPT-4 win rate, and that "
            "more beams then make responses longer and worse (over-optimisation), which it attributes to "
            "the labellers' preference for length. Here the gold judge is the task's summed token reward "
            "with no length term; one DPO policy learns from labels by that judge, the other from labels "
            f"by gold + {LENGTH_BIAS}·length (a known length bias). The win rate is against the SFT "
            f"reference's own samples on the same held-out prompts (mean gold {ref_gold.mean():.3f}, mean "
            f"length {ref_len:.1f} letters in seed {args.seed})."
        ),
    )
    ref_rows = []
    for label, b in (("sample", None), ("greedy (1 beam)", 1)):
        g, lens = decode(ref, b)
        ref_rows.append(
            ["reference (SFT)", "–", label, Items.mean(wins(g, ref_gold)), Items.mean(g), Items.mean(lens)]
        )
    for setting in scale.get("settings", tuple(SETTINGS)):
        title, kwargs = SETTINGS[setting]
        results: dict[float, dict[str, dict]] = {}
        rows = list(ref_rows)
        curves, traj_rows = {}, []
        for beta in scale["betas"]:
            doc.log(f"{NAME} [{setting}]: DPO β={beta} ({scale['dpo_steps']} steps)")
            tag = "" if setting == "unbiased" else f"_{setting}"
            dpo_dir = runs.train_dpo(
                args, beta, scale["dpo_steps"], sft_dir, scale.get("eval_every"), task_kwargs=kwargs, tag=tag
            )
            if not report.run_dirs:  # the first DPO run: what `dpoq demo` suggests to try next
                report.run_dirs = {"sft": sft_dir, "dpo": dpo_dir}
            pol = load_model(str(dpo_dir))
            per: dict[str, dict] = {}
            for label, b in [("sample", None)] + [(f"beam {b}", b) for b in scale["beams"]]:
                g, lens = decode(pol, b)
                per[label] = {  # per prompt: bootstrap intervals and paired differences once merged
                    "win_rate": Items.mean(wins(g, ref_gold)),
                    "gold": Items.mean(g),
                    "length": Items.mean(lens),
                }
                rows.append([f"DPO β={beta}", setting, label, *per[label].values()])
                doc.log(
                    f"{NAME} [{setting}] β={beta} {label}: "
                    + ", ".join(f"{k} {float(v):.3f}" for k, v in per[label].items())
                )
            results[beta] = per
            few, wide = max(b for b in scale["beams"] if b <= 5), scale["beams"][-1]
            k = f"{setting}/beta{beta}"
            report.numbers |= {
                f"{k}/gain_few": per[f"beam {few}"]["win_rate"] - per["beam 1"]["win_rate"],
                f"{k}/drop_wide": per[f"beam {few}"]["gold"] - per[f"beam {wide}"]["gold"],
                f"{k}/longer_wide": per[f"beam {wide}"]["length"] - per["beam 1"]["length"],
                f"{k}/sample_win": per["sample"]["win_rate"],
            }
            curves[f"β={beta}"], traj = pe.trajectory(dpo_dir)
            traj_rows.append([beta, *traj.values()])
        report.add(
            title,
            f"{len(pairs)} held-out prompts. Win rate against the reference's samples (ties count half); "
            "mean gold reward (length-neutral judge); mean length in letters. The reference rows are the "
            "SFT model itself (its sampled row plays against other samples of the same model).",
            doc.Table(
                ["model", "labels", "decoding", "gold win rate", "mean gold reward", "mean length"], rows
            ),
            curves_figure(results, scale["beams"], ref_len, f"beams_{setting}", title),
        )
        report.add(
            "Chosen and rejected log-likelihood during DPO",
            "Held-out mean summed log π(y|x) of the chosen and rejected responses at the first and last "
            "evaluation of each DPO run, and the last implicit-reward margin.",
            doc.Table(["β", *pe.TRAJ_COLUMNS], traj_rows),
            pe.trajectory_figure(curves, f"loglik_{setting}", f"{setting} labels: held-out log-likelihoods"),
            level=2,
        )
    if len(scale.get("settings", SETTINGS)) == 2:
        report.add(
            "With and without the length bias",
            "The checks of each labeller's section side by side: does the paper's pattern appear with "
            "the length bias and not without it?",
        )
        # the comparison section comes first: it answers the question of this experiment
        report.sections.insert(0, report.sections.pop())
    report.meta = harness.run_meta(args)
    return report


# ------------------------------------------------------------------------------------------ scales

# Smaller than the single-seed version (400/300 steps, 256 prompts) so five seeds fit on 2 shared cores.
SCALES = {
    "full": dict(
        sft_steps=300, dpo_steps=150, betas=(0.1, 1.0), beams=(1, 2, 5, 10, 20), n_prompts=64, eval_every=25
    ),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.3,), beams=(1, 2, 5), n_prompts=64, eval_every=25),
}


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    return harness.experiment_main(sys.modules[__name__], argv, scales, results_dir)


if __name__ == "__main__":
    sys.exit(main())
