"""Experiment 2: likelihood search on a DPO policy is reward search, and it over-optimises (PAPER.md §4).

On the dense_reward task (gold judge = the known summed token reward; within the data longer is
better, beyond `gold_len_limit` letters every letter costs), SFT a reference on all responses, DPO it
at three β, then decode held-out prompts with beam search at 1, 2, 5, 10, 20 beams (and plain sampling
at temperature 1). Report the gold judge's win rate against the preferred reference response (ties
count half; 95% Wilson interval), mean gold reward and mean length, and plot win rate and length
against beams. Writes experiments/results/search_overopt.md.

    python -m experiments.search_overopt            # full (256 prompts, 3 β)
    python -m experiments.search_overopt --quick    # a smoke run
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

NAME = "search_overopt"
TASK = "dense_reward"
SCALES = {
    "full": dict(sft_steps=400, dpo_steps=300, betas=(0.1, 0.3, 1.0), beams=(1, 2, 5, 10, 20), n_prompts=256),
    "quick": dict(sft_steps=150, dpo_steps=100, betas=(0.3,), beams=(1, 2, 5), n_prompts=64),
}


def win_stats(gen_scores: np.ndarray, ref_scores: np.ndarray) -> dict[str, float]:
    """Gold-judge win rate of generations against reference responses; ties count half."""
    gen_scores, ref_scores = np.asarray(gen_scores, np.float64), np.asarray(ref_scores, np.float64)
    if gen_scores.shape != ref_scores.shape or gen_scores.size == 0:
        raise ValueError(
            f"win_stats: shapes {gen_scores.shape} and {ref_scores.shape} must match and be non-empty"
        )
    wins = float(np.sum(gen_scores > ref_scores) + 0.5 * np.sum(gen_scores == ref_scores))
    n = gen_scores.size
    lo, hi = common.wilson_interval(wins, n)
    return {"n": n, "win_rate": wins / n, "lo": lo, "hi": hi}


def curves_figure(
    results: dict[float, dict[str, dict]], beams: Sequence[int], ref_len: float
) -> common.Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for beta, per in results.items():
        xs = list(beams)
        st = [per[f"beam {b}"] for b in beams]
        wr = np.array([s["win_rate"] for s in st])
        err = np.array([[s["win_rate"] - s["lo"] for s in st], [s["hi"] - s["win_rate"] for s in st]])
        line = axes[0].errorbar(xs, wr, yerr=err, marker="o", capsize=3, label=f"β={beta}")
        color = line[0].get_color()
        if "sample" in per:
            axes[0].axhline(per["sample"]["win_rate"], color=color, ls=":", lw=1)
        axes[1].plot(xs, [s["gold"] for s in st], "o-", color=color, label=f"β={beta}")
        axes[2].plot(xs, [s["length"] for s in st], "o-", color=color, label=f"β={beta}")
    axes[0].set_title("gold win rate vs preferred reference\n(95% Wilson; dotted: sampling T=1)", fontsize=9)
    axes[1].set_title("mean gold reward", fontsize=9)
    axes[2].set_title("mean length (letters)", fontsize=9)
    axes[2].axhline(ref_len, color="gray", ls="--", lw=1, label="preferred refs")
    for ax in axes:
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(list(beams), [str(b) for b in beams])
        ax.set_xlabel("beams")
    axes[2].legend(fontsize=7)
    return common.Figure("beams", common.fig_to_png(fig), "Win rate, gold reward and length against beams")


def run(args: argparse.Namespace, scale: dict) -> common.Report:
    common.require_synthetic(args.config, args.overrides, TASK, NAME)
    task = common.make_task(TASK, seed=args.seed)
    tok = task.tokenizer
    common.log(f"{NAME}: SFT reference on all responses ({scale['sft_steps']} steps)")
    sft_dir = common.train_sft(args, "all", scale["sft_steps"])
    pairs = task.preference_examples(scale["n_prompts"], split="test")
    prompts = [tok.encode(p.prompt) for p in pairs]
    ref_gold = np.array([p.meta["chosen_reward"] for p in pairs])
    ref_len = float(np.mean([len(p.chosen) for p in pairs]))
    max_new = task.max_len + 1
    results: dict[float, dict[str, dict]] = {}
    rows = []
    for beta in scale["betas"]:
        common.log(f"{NAME}: DPO β={beta} ({scale['dpo_steps']} steps)")
        dpo_dir = common.train_dpo(args, beta, scale["dpo_steps"], sft_dir)
        pol = common.load_model(dpo_dir)
        per: dict[str, dict] = {}
        settings = [("sample", None)] + [(f"beam {b}", b) for b in scale["beams"]]
        for label, b in settings:
            if b is None:
                outs = common.sample(pol, prompts, max_new_tokens=max_new, seed=args.seed)
            else:
                outs = common.beam_search(pol, prompts, num_beams=b, max_new_tokens=max_new)
            gold = np.array([task.gold_score(p.prompt, o) for p, o in zip(pairs, outs, strict=True)])
            lens = np.array([len(common.strip_eos(o, tok.eos_token_id)) for o in outs])
            length = float(lens.mean())
            over = float(np.mean(lens > task.gold_len_limit))  # where the gold reward turns to a penalty
            st = win_stats(gold, ref_gold) | {"gold": float(gold.mean()), "length": length, "over": over}
            per[label] = st
            rows.append(
                [beta, label, st["win_rate"], f"[{st['lo']:.3f}, {st['hi']:.3f}]", st["gold"], length, over]
            )
            common.log(
                f"{NAME}: β={beta} {label}: win {st['win_rate']:.3f}, gold {st['gold']:.3f}, len {length:.1f}"
            )
        results[beta] = per

    report = common.Report(
        "Experiment 2: beam search on DPO policies — reward search and over-optimisation",
        intro=(
            "Paper §5.2 (PAPER.md §4): maximising the KL-regularised reward over a sequence equals "
            "maximising its likelihood under the DPO policy, so beam search is reward search; the paper "
            "reports that 5 beams beat 1 beam by about 10–15% GPT-4 win rate, and that more beams make "
            "responses longer and worse (over-optimisation). Here the judge is the task's gold reward, so "
            "the win rate is exact; the preference data reward length up to "
            f"{task.gold_len_limit} letters (+{task.bonus}/letter) and penalise it beyond "
            f"(−{task.length_penalty}/letter), which the data rarely shows."
        ),
    )
    report.add(
        "Win rate, gold reward and length",
        f"{len(pairs)} held-out prompts; the opponent is the preferred response of the held-out pair "
        f"(mean gold reward {ref_gold.mean():.3f}, mean length {ref_len:.1f} letters). "
        "Win rate counts ties as half; the interval is the 95% Wilson score interval.",
        common.Table(
            [
                "β",
                "decoding",
                "win rate",
                "95% CI",
                "mean gold reward",
                "mean length",
                f"share > {task.gold_len_limit} letters",
            ],
            rows,
        ),
        curves_figure(results, scale["beams"], ref_len),
    )
    report.add("What the curve shows", summarise(results, scale["beams"]))
    report.meta = common.run_meta(args)
    return report


def summarise(results: dict[float, dict[str, dict]], beams: Sequence[int]) -> str:
    """Plain statements read off the numbers (not hand-written claims)."""
    lines = []
    for beta, per in results.items():
        st = {b: per[f"beam {b}"] for b in beams}
        b0, b1 = beams[0], beams[-1]
        best_wr = max(beams, key=lambda b: st[b]["win_rate"])
        best_gold = max(beams, key=lambda b: st[b]["gold"])
        sm = per["sample"]
        lines.append(
            f"- β={beta}: win rate {st[b0]['win_rate']:.3f} at {b0} beam(s) → "
            f"{st[b1]['win_rate']:.3f} at {b1} (highest {st[best_wr]['win_rate']:.3f} at {best_wr}); "
            f"mean gold reward {st[b0]['gold']:.3f} → "
            f"{st[b1]['gold']:.3f} (highest at {best_gold}); length {st[b0]['length']:.1f} → "
            f"{st[b1]['length']:.1f} letters; sampling: win rate {sm['win_rate']:.3f}, "
            f"gold {sm['gold']:.3f}, "
            f"length {sm['length']:.1f}, {100 * sm['over']:.0f}% beyond the limit."
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return common.parse_experiment_args(common.experiment_parser(NAME, __doc__, TASK), argv, NAME, TASK)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return common.write_report(NAME, run(args, SCALES["quick" if args.quick else "full"]), args.results)


if __name__ == "__main__":
    sys.exit(main())
