"""Experiment 2: likelihood search on a DPO policy is reward search, and it over-optimises (paper §4).

On the dense_reward task with a length-neutral gold judge (the known summed token reward, centred so
that a letter of the data-generating reference scores 0 on average, no length term), SFT a reference
on all responses, then DPO it at several β on preferences from two labellers: the gold judge itself
(Bradley–Terry on the gold reward) and a length-biased one (gold reward + λ·length, the bias TL;DR
labellers are said to have). Decode held-out prompts with beam search at several widths and length
penalties α (transformers' score / n**α; 1 beam is greedy, as in transformers), by sampling (T = 1)
and by best-of-N samples ranked by the summed implicit reward Σ r_t or by the length-normalised
reference likelihood; report the gold win rate against the reference's own samples (ties count
half), mean gold reward, gold per letter and mean length. Does the paper's pattern (a few beams beat
one, many beams give longer, worse answers) appear at α = 1, with the bias and not without?
Verdicts from 95% intervals over seeds of per-seed differences.

    python -m dpoq_jax.experiments.search_overopt   # full: seeds 0-4, two labellers, β 0.1 and 1.0
    python -m dpoq_jax.experiments.search_overopt --quick   # a smoke run (2 seeds)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis.seeds import Items
from dpoq_jax.data.synthetic import make_task
from dpoq_jax.decode.beam import best_beams
from dpoq_jax.decode.core import response_lists, strip_eos
from dpoq_jax.decode.sampling import SampleConfig, generate, sample_responses
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
GOLD = {"bonus": 0.0, "length_penalty": 0.0}  # no length term: the summed W (centred by `gold_judge`)
SETTINGS = {
    "unbiased": ("Labels from the gold judge (no length bias)", {}),
    "biased": (
        f"Labels with a length bias (gold + {LENGTH_BIAS}·length)",
        {"label_length_bias": LENGTH_BIAS},
    ),
}


def gold_judge(seed: int, max_len: int | None, n: int = 4096) -> dict[str, float]:
    """The task kwargs of a length-neutral gold judge: Σ_t (W[s_t, a_t] − m) over letters, where m is
    the mean W per letter of the data-generating reference's own responses (n of them, a fixed rng),
    so that a reference-like letter adds 0 on average and only what the letters are, not how many,
    moves the score."""
    kw = {**GOLD, **({"max_len": max_len} if max_len else {})}
    task = make_task(TASK, seed=seed, **kw)
    rng = np.random.default_rng([seed, 2024])
    prompts = [p.prompt for p in task.preference_examples(64, split="train")]
    total, letters = 0.0, 0
    for i in range(n):
        y = task.sample_reference(prompts[i % len(prompts)], rng)
        total += task.gold_score(prompts[i % len(prompts)], y)
        letters += len(strip_eos(y, task.tokenizer.eos_token_id))
    m = total / max(letters, 1)
    return {**kw, "bonus": -m, "length_penalty": m}  # every letter (before and after the limit) gets −m


def size_overrides(max_len: int | None) -> list[str]:
    """Config overrides that fit responses of up to max_len letters + EOS (none truncated)."""
    if not max_len:
        return []
    return [
        f"--config.data.response_len={max_len + 2}",
        f"--config.data.seq_len={max_len + 10}",
        f"--config.model.config.max_position_embeddings={max(64, 2 * (max_len + 10))}",
    ]


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
    results: dict[float, dict[str, dict]],
    beams: Sequence[int],
    alpha: float,
    ref_len: float,
    name: str,
    title: str,
) -> doc.Figure:
    """Win rate, gold and length against beams at length penalty α (1 beam: greedy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for beta, per in results.items():
        xs = list(beams)
        st = [per[beam_label(b, alpha)] for b in beams]
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
    fig.suptitle(f"{title}, length penalty α = {alpha:g}", fontsize=9)
    return doc.Figure(name, doc.fig_to_png(fig), f"{title}: win rate, gold reward and length against beams")


def alphas_of(scale: dict) -> tuple[float, ...]:
    return tuple(scale.get("alphas", (0.0,)))


def verdict_alpha(scale: dict) -> float:
    """The length penalty the verdicts read: 1.0 (transformers' default) where it was run."""
    alphas = alphas_of(scale)
    return 1.0 if 1.0 in alphas else alphas[-1]


def beam_label(b: int, alpha: float) -> str:
    """A decoding's row label: "beam b, α=…" (1 beam is greedy, the same at every α: "beam 1")."""
    return f"beam {b}" + (f", α={alpha:g}" if b > 1 else "")


def few_and_wide(beams: Sequence[int]) -> tuple[int, int]:
    """The pattern's widths: the widest search of at most 5 beams, and the widest of all."""
    return max(b for b in beams if b <= 5), beams[-1]


def key(setting: str, beta: float, alpha: float) -> str:
    return f"{setting}/beta{beta}/alpha{alpha:g}"


def pattern_checks(
    n: dict, setting: str, betas: Sequence[float], beams: Sequence[int], alpha: float
) -> list[tuple[bool, str]]:
    """The paper's pattern at length penalty α, per β, each from a 95% interval of a per-seed
    difference: a few beams beat one (win rate at 5 beams, or the widest ≤ 5, minus 1 beam > 0); the
    widest search is worse than 5 beams (gold reward at 5 minus at the widest > 0); and longer than
    1 beam (length difference > 0)."""
    few, wide = few_and_wide(beams)
    out = []
    for beta in betas:
        k = key(setting, beta, alpha)
        gain, drop, longer = n[f"{k}/gain_few"], n[f"{k}/drop_wide"], n[f"{k}/longer_wide"]
        out.append((gain.above(0), f"β={beta}, α={alpha:g}: {few} beams − 1 beam win rate {gain}"))
        if wide > few:
            out.append((drop.above(0), f"gold at {few} − at {wide} beams {drop}"))
        out.append((longer.above(0), f"length at {wide} − at 1 beam {longer} letters"))
    return out


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """Per labeller, at α = `verdict_alpha` (rules of 2026-12-07, docs/experiments.md §2): holds if
    every check of `pattern_checks` passes for every β, does not hold if none does. Overall (with vs
    without the bias): holds if the biased labeller shows more checks passing than the unbiased one
    and the widest beams are longer only with the bias."""
    out, passed = {}, {}
    settings = scale.get("settings", tuple(SETTINGS))
    alpha = verdict_alpha(scale)
    for setting in settings:
        checks = pattern_checks(n, setting, scale["betas"], scale["beams"], alpha)
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
        longer = {
            s: all(n[f"{key(s, b, alpha)}/longer_wide"].above(0) for b in scale["betas"]) for s in settings
        }
        ok = pb > pu and longer["biased"] and not longer["unbiased"]
        some = pb > pu or (longer["biased"] and not longer["unbiased"])
        why = (
            f"at α={alpha:g}, checks of the paper's pattern passed: {pb}/{nb} with the length-biased "
            f"labeller, {pu}/{nu} without; widest beams longer than 1 beam at every β: with bias "
            f"{longer['biased']}, without {longer['unbiased']}"
        )
        status = "holds" if ok else "partly" if some else "does not hold"
        claim = "the paper's over-optimisation pattern comes from the labeller's length bias"
        out = {"With and without the length bias": doc.Verdict(claim, status, why + "."), **out}
    return out


def best_of_n(
    pol: Any, ref: Any, prompts: list[list[int]], n: int, max_new: int, beta: float, seed: int
) -> dict[str, list[list[int]]]:
    """Per prompt, the best of n policy samples (T = 1) by the summed implicit reward Σ r_t and by the
    length-normalised reference likelihood (mean log π_ref per token, EOS included)."""
    rows = [p for p in prompts for _ in range(n)]
    cfg = SampleConfig(max_new_tokens=max_new)
    g = generate(pol, rows, cfg, seed=seed, ref_model=ref, beta=beta)
    outs = response_lists(g.tokens, g.mask)
    by_reward = g.reward_sum.reshape(len(prompts), n)
    by_ref = ((g.ref_logps * g.mask).sum(-1) / np.maximum(g.mask.sum(-1), 1)).reshape(len(prompts), n)
    pick = lambda score: [outs[i * n + int(np.argmax(score[i]))] for i in range(len(prompts))]  # noqa: E731
    return {"Σ r_t": pick(by_reward), "mean log π_ref": pick(by_ref)}


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: SFT, DPO per labeller and β, decoding at every width and α; numbers for the verdicts."""
    runs.require_synthetic(args.config, args.overrides, TASK, NAME)
    max_len = scale.get("max_len")
    gold = gold_judge(args.seed, max_len)
    args = argparse.Namespace(**{**vars(args), "task_kwargs": gold})
    if max_len:  # longer rows than the config's: its own runs, beside those of the other experiments
        args.overrides = [*size_overrides(max_len), *args.overrides]
        args.workdir = str(Path(args.workdir) / f"maxlen{max_len}")
    task = make_task(TASK, seed=args.seed, **gold)
    tok = task.tokenizer
    doc.log(f"{NAME}: SFT reference on all responses ({scale['sft_steps']} steps)")
    sft_dir = runs.train_sft(args, "all", scale["sft_steps"])
    ref = load_model(str(sft_dir))
    pairs = task.preference_examples(scale["n_prompts"], split="test")
    prompts = [tok.encode(p.prompt) for p in pairs]
    max_new = task.max_len + 1
    alphas, n_best = alphas_of(scale), scale.get("best_of", 0)
    few, wide = few_and_wide(scale["beams"])

    def judge(outs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        g = np.array([task.gold_score(p.prompt, o) for p, o in zip(pairs, outs, strict=True)])
        return g, np.array([len(strip_eos(o, tok.eos_token_id)) for o in outs], np.float64)

    def decode(model, b: int | None, alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        if b is None:
            return judge(sample_responses(model, prompts, max_new_tokens=max_new, seed=args.seed + 1))
        # 1 beam is greedy whatever α (transformers routes num_beams=1 to greedy search)
        a = alpha if b > 1 else 0.0
        return judge(best_beams(model, prompts, num_beams=b, max_new_tokens=max_new, length_penalty=a))

    def cells(g: np.ndarray, lens: np.ndarray) -> dict[str, Items]:
        per_letter = [x / n for x, n in zip(g, lens, strict=True) if n > 0]
        return {  # per prompt: bootstrap intervals and paired differences once merged
            "win_rate": Items.mean(wins(g, ref_gold)),
            "gold": Items.mean(g),
            # no answer with a letter: undefined (NaN; the merge leaves such a seed out), not 0
            "gold_per_letter": Items.mean(per_letter or [float("nan")]),
            "length": Items.mean(lens),
        }

    # The opponent: the reference's own samples (seed args.seed, not the policies' sampling seed).
    ref_outs = sample_responses(ref, prompts, max_new_tokens=max_new, seed=args.seed)
    ref_gold, ref_lens = judge(ref_outs)
    ref_len = float(ref_lens.mean())
    report = doc.Report(
        "Experiment 2: beam search on DPO policies — reward search and over-optimisation",
        intro=(
            "Claim (paper §4, search equals likelihood): maximising the KL-regularised reward over a "
            "sequence equals maximising its likelihood under the DPO policy, so beam search is reward "
            "search; the paper reports that 5 beams beat 1 beam by about 10–15% GPT-4 win rate, and that "
            "more beams then make responses longer and worse (over-optimisation), which it attributes to "
            "the labellers' preference for length. Here the gold judge is the task's summed token reward "
            f"with no length term, centred so that a letter of the data-generating reference adds 0 on "
            f"average (m = {-gold['bonus']:.3f} subtracted per letter in seed {args.seed}); responses "
            f"may run to {task.max_len} letters. One DPO policy learns from labels by that judge, the "
            f"other from labels by gold + {LENGTH_BIAS}·length (a known length bias). Beam search ranks "
            "finished beams by Σ log π / n^α (transformers' length penalty; α = 1 is its default, α = 0 "
            "pure likelihood); 1 beam is greedy. The win rate is against the SFT reference's own samples "
            f"on the same held-out prompts (mean gold {ref_gold.mean():.3f}, mean length {ref_len:.1f} "
            f"letters in seed {args.seed})."
        ),
    )
    columns = ["model", "labels", "decoding", "α", "gold win rate", "mean gold reward", "gold per letter",
               "mean length"]  # fmt: skip
    ref_rows = []
    for label, b in (("sample", None), ("greedy (1 beam)", 1)):
        ref_rows.append(["reference (SFT)", "–", label, "–", *cells(*decode(ref, b)).values()])
    for setting in scale.get("settings", tuple(SETTINGS)):
        title, kwargs = SETTINGS[setting]
        results: dict[float, dict[str, dict]] = {}
        rows = list(ref_rows)
        curves, traj_rows, check_rows = {}, [], []
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
            plan = [("sample", None, "–")] + [
                (beam_label(b, a), b, f"{a:g}" if b > 1 else "–")
                for b in scale["beams"]
                for a in (alphas if b > 1 else alphas[:1])
            ]
            for label, b, a in plan:
                per[label] = cells(*decode(pol, b, 0.0 if a == "–" else float(a)))
                rows.append([f"DPO β={beta}", setting, label.split(",")[0], a, *per[label].values()])
            if n_best:
                picked = best_of_n(pol, ref, prompts, n_best, max_new, beta, args.seed + 2)
                for how, outs in picked.items():
                    label = f"best of {n_best} by {how}"
                    per[label] = cells(*judge(outs))
                    rows.append([f"DPO β={beta}", setting, label, "–", *per[label].values()])
            doc.log(
                f"{NAME} [{setting}] β={beta}: "
                + "; ".join(f"{lab}: win {float(v['win_rate']):.3f}, len {float(v['length']):.1f}"
                            for lab, v in per.items())  # fmt: skip
            )
            results[beta] = per

            def at(b: int, alpha: float, per: dict = per) -> dict[str, Items]:
                return per[beam_label(b, alpha)]

            for alpha in alphas:
                k = key(setting, beta, alpha)
                report.numbers |= {
                    f"{k}/gain_few": at(few, alpha)["win_rate"] - at(1, alpha)["win_rate"],
                    f"{k}/drop_wide": at(few, alpha)["gold"] - at(wide, alpha)["gold"],
                    f"{k}/longer_wide": at(wide, alpha)["length"] - at(1, alpha)["length"],
                }
                diffs = (report.numbers[f"{k}/{x}"] for x in ("gain_few", "drop_wide", "longer_wide"))
                check_rows.append([beta, f"{alpha:g}", *diffs])
            report.numbers[f"{setting}/beta{beta}/sample_win"] = per["sample"]["win_rate"]
            curves[f"β={beta}"], traj = pe.trajectory(dpo_dir)
            traj_rows.append([beta, *traj.values()])
        report.add(
            title,
            f"{len(pairs)} held-out prompts. Win rate against the reference's samples (ties count half); "
            "mean gold reward (length-neutral judge); gold per letter (responses with at least one "
            "letter); mean length in letters. The reference rows are the SFT model itself (its sampled "
            "row plays against other samples of the same model)."
            + (f" Best of {n_best}: {n_best} samples (T = 1) of the policy per prompt, the one with the "
               "highest summed implicit reward Σ r_t, or with the highest mean log π_ref per token."
               if n_best else ""),  # fmt: skip
            doc.Table(columns, rows),
            curves_figure(results, scale["beams"], verdict_alpha(scale), ref_len, f"beams_{setting}", title),
        )
        report.add(
            "The pattern's three differences at each length penalty",
            "Per-seed paired differences on the same prompts: win rate at "
            f"{few} beams − 1 beam (a few beams beat one: > 0), gold at {few} − at {wide} beams "
            f"(over-optimisation: > 0), length at {wide} − at 1 beam (longer: > 0). The verdict reads "
            f"α = {verdict_alpha(scale):g}.",
            doc.Table(["β", "α", f"win {few} − 1 beam", f"gold {few} − {wide} beams",
                       f"length {wide} − 1 beam"], check_rows),  # fmt: skip
            level=2,
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
# Responses up to 64 letters (max_len; the config's 32 capped beam lengths at 33 tokens); α as in
# transformers; best of 16 samples. The verdicts read α = 1.
SCALES = {
    "full": dict(
        sft_steps=300,
        dpo_steps=150,
        betas=(0.1, 1.0),
        beams=(1, 2, 5, 10, 20),
        alphas=(0.0, 0.5, 1.0),
        best_of=16,
        max_len=64,
        n_prompts=64,
        eval_every=25,
    ),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.3,), beams=(1, 2, 5), n_prompts=64, eval_every=25),
}


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    return harness.experiment_main(sys.modules[__name__], argv, scales, results_dir)


if __name__ == "__main__":
    sys.exit(main())
