"""Experiment 7: does credit assignment pay off in training? Learning curves of DPO, TDPO₂, token-weighted
DPO (TIS-DPO weights from the true token rewards, from a DPO oracle's implicit rewards, uniform) and
selective DPO (SePO, 30% of the tokens by the oracle's rewards) on the synthetic tasks whose true token
rewards are known. Rules: docs/experiments.md §7 (dated before the first run).

    python -m dpoq_jax.experiments.token_training                 # full: 2 tasks, 3 data sizes, seeds 0-4
    python -m dpoq_jax.experiments.token_training --quick         # a smoke run (1 task, 2 sizes, 1 seed)
    python -m dpoq_jax.experiments.token_training --seeds 3 --tasks dense_reward   # one part of the plan

Every part is cached on disk: a finished training run is reused (runs.train_run), each run's held-out
evaluation is kept in its eval.json, each token cache is kept; a stopped plan restarts where it stopped
and a rerun of the report recomputes nothing. The oracle of (b) at data size N is the DPO run on the same
N pairs (its implicit rewards log π_DPO/π_SFT on those pairs), so (b) sees no pair that DPO does not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis.document import log
from dpoq_jax.analysis.seeds import Interval, Items, items_interval, t_interval
from dpoq_jax.experiments import harness, runs

NAME = "token_training"
RESULTS = harness.RESULTS_DIR
# method -> (label, loss overrides, token cache it reads or None)
METHODS: dict[str, tuple[str, dict[str, Any], str | None]] = {
    "dpo": ("DPO", {"loss.loss_type": "sigmoid"}, None),
    "tdpo2": (
        "TDPO₂ (α 0.5)",
        {"loss.loss_type": "tdpo", "loss.tdpo_variant": 2, "loss.tdpo_alpha": 0.5},
        None,
    ),
    "tw_true": ("TIS weights, true rewards (a)", {"loss.loss_type": "token_weighted"}, "true"),
    "tw_oracle": ("TIS weights, DPO oracle (b)", {"loss.loss_type": "token_weighted"}, "oracle"),
    "tw_uniform": ("uniform weights (c)", {"loss.loss_type": "token_weighted"}, "ones"),
    "sepo_oracle": (
        "SePO 30%, DPO oracle (b)",
        {"loss.loss_type": "selective", "loss.select_ratio": 0.3, "loss.beta": 2.0, "loss.simpo_gamma": 0.5},
        "oracle",
    ),
}
# task -> (task settings, how the gold score is measured)
TASKS: dict[str, tuple[dict[str, Any], str]] = {
    "dense_reward": ({}, "sampled"),  # gold R(y) of one sample (T = 1) per held-out prompt
    # the fluent setting of experiment 1: SFT data flip each digit to (d + 5) mod 10 half the time, the
    # rejected responses hold exactly such flips: the reference cannot tell, the preferences can
    "error_injection": ({"error_shift": 5, "sft_noise": 0.5}, "greedy"),  # fraction of correct tokens
}
SCALES = {
    "full": dict(
        sizes=(128, 512, 2048),
        sft_steps=400,
        dpo_steps=150,
        lr=1e-4,  # the pilot's choice (docs/experiments.md §7): seed 100, n = 512, lr 1e-4 / 3e-4 / 1e-3
        beta=0.1,
        n_eval=256,
        tasks=tuple(TASKS),
        seeds=(0, 1, 2, 3, 4),
    ),
    "quick": dict(
        sizes=(64, 256),
        sft_steps=100,
        dpo_steps=30,
        lr=1e-3,
        beta=0.1,
        n_eval=32,
        tasks=("error_injection",),
        seeds=(0,),
    ),
    # the CI test's: every arm, two seeds (intervals), one size, a few steps
    "tiny": dict(
        sizes=(16,),
        sft_steps=4,
        dpo_steps=2,
        lr=1e-4,
        beta=0.1,
        n_eval=4,
        tasks=("dense_reward",),
        seeds=(0, 1),
    ),
}
LABELS = {"sft": "SFT reference (no preference training)", **{m: v[0] for m, v in METHODS.items()}}
RULES = (
    "docs/experiments.md §7, written 2026-12-07 06:20 UTC before any run of seeds 0-4, committed in 46e94f1"
)
TIS = {"loss.tis_mu": 1.0, "loss.tis_lower": -1.0, "loss.tis_upper": 1.0}  # the config defaults, explicit


def _overrides(d: dict[str, Any]) -> list[str]:
    return [f"--config.{k}={v}" for k, v in d.items()]


def true_reward_fn(task_obj: Any):
    """values(item, side, ids): the task's true token rewards of the response (prompt text from its ids)."""
    tok = task_obj.tokenizer

    def values(item, side, ids):
        return task_obj.gold_token_rewards(tok.decode(item.prompt_ids), ids)

    return values


def build_cache(kind: str, cfg: dict, out: Path, task_obj: Any, oracle: Path | None, sft: Path) -> Path:
    from dpoq_jax.data.token_cache import is_cache
    from dpoq_jax.train.precompute import token_rewards, write_values_cache

    if is_cache(str(out)):
        return out
    log(f"  token cache {out.name}")
    if kind == "oracle":
        token_rewards(cfg, str(oracle), str(sft), str(out), beta=1.0)
    elif kind == "true":
        write_values_cache(
            cfg, str(out), "token_rewards", true_reward_fn(task_obj), provenance={"values": "true"}
        )
    else:
        write_values_cache(cfg, str(out), "token_weights", lambda item, side, ids: np.ones(len(ids)))
    return out


def evaluate(run_dir: Path, sft_dir: Path, task_obj: Any, how: str, n: int, beta: float, seed: int) -> dict:
    """Held-out gold score per prompt (greedy or one sample) and preference accuracy per pair (implicit
    reward β log π/π_SFT of chosen > rejected), as lists (the bootstrap resamples them)."""
    from dpoq_jax.experiments.implicit_rewards import heldout_accuracy
    from dpoq_jax.experiments.policy_effects import generation_quality
    from dpoq_jax.train.load import load_model

    policy, ref = load_model(str(run_dir)), load_model(str(sft_dir))
    prompts = [p.prompt for p in task_obj.preference_examples(n, split="test")]
    limit = int(getattr(task_obj, "max_len", getattr(task_obj, "max_digits", 32))) + 1
    q = generation_quality(policy, task_obj, prompts, limit, seed)[how]
    acc = heldout_accuracy(policy, ref, task_obj, n, beta)
    return {
        "gold": q["gold score"].parts[0].tolist(),
        "length": q["length"].parts[0].tolist(),
        "accuracy": acc.parts[0].tolist(),
    }


def run_part(args: argparse.Namespace, scale: dict, task: str, seed: int) -> dict[int, dict[str, dict]]:
    """One (task, seed): its SFT run, then every (size, method): train, cache, evaluate -> evals."""
    from dpoq_jax.data.synthetic import make_task
    from dpoq_jax.train.load import run_config

    kwargs, how = TASKS[task]
    root = Path(args.workdir) / task / f"seed{seed}"
    config = runs.default_config(task)
    task_obj = make_task(task, **{**kwargs, "seed": seed})
    sft = runs.train_run(config, "sft", root / "sft", steps=scale["sft_steps"], seed=seed, task_kwargs=kwargs)
    out: dict[int, dict[str, dict]] = {}
    sft_eval = root / "sft" / "eval_sft.json"  # the reference itself: the premise's baseline
    marker = json.loads((sft / "experiment_run.json").read_text())
    if not (sft_eval.exists() and json.loads(sft_eval.read_text()).get("run") == marker):
        ev = evaluate(sft, sft, task_obj, how, scale["n_eval"], scale["beta"], seed)
        ev.update(run=marker, accuracy=[float("nan")] * len(ev["accuracy"]))  # no preference of its own
        sft_eval.write_text(json.dumps(ev))
    sft_ev = json.loads(sft_eval.read_text())
    for n_pairs in scale["sizes"]:
        base = {"data.num_examples": n_pairs, "data.num_eval": 64, "train.eval_every": 0, **TIS}
        out[n_pairs] = {"sft": sft_ev}
        caches: dict[str, Path] = {}
        for method in args.methods:
            label, loss, cache = METHODS[method]
            over = {**base, **loss}
            work = root / f"n{n_pairs}" / method
            if cache is not None:
                dpo_dir = root / f"n{n_pairs}" / "dpo"
                if cache == "oracle" and not (dpo_dir / "experiment_run.json").exists():
                    raise SystemExit(f"{method} needs the dpo run of its size first (methods in order)")
                cfg = run_config(str(dpo_dir))  # None unless a finished run is there
                if cfg is None:
                    raise SystemExit(f"{method}: run the dpo method first (its config names the data)")
                caches[cache] = build_cache(
                    cache, cfg, root / f"n{n_pairs}" / f"cache_{cache}", task_obj, dpo_dir, sft
                )
                over["loss.token_weights"] = str(caches[cache])
            ev_file = work / "eval.json"
            t_train = time.time()
            runs.train_run(
                config,
                "dpo",
                work,
                steps=scale["dpo_steps"],
                seed=seed,
                beta=over.pop("loss.beta", scale["beta"]),
                lr=scale["lr"],
                init_from=sft,
                overrides=_overrides(over),
                task_kwargs=kwargs,
            )
            marker = json.loads((work / "experiment_run.json").read_text())
            if ev_file.exists() and json.loads(ev_file.read_text()).get("run") == marker:
                out[n_pairs][method] = json.loads(ev_file.read_text())
                continue
            t0 = time.time()
            ev = evaluate(work, sft, task_obj, how, scale["n_eval"], scale["beta"], seed)
            ev.update(run=marker, eval_seconds=time.time() - t0, train_seconds=t0 - t_train)
            ev_file.write_text(json.dumps(ev))
            out[n_pairs][method] = ev
            log(
                f"  {task} seed {seed} n {n_pairs} {method}: gold {np.mean(ev['gold']):.4f} "
                f"acc {np.mean(ev['accuracy']):.3f}"
            )
    return out


def weight_stats(cache_dir: Path) -> dict[str, float]:
    """Diagnostics of a rewards cache as the TIS transform (μ 1, clamp ±1) turns it into weights: mean d
    and mean weight per token of the chosen and of the rejected responses."""
    from dpoq_jax.data.token_cache import TokenCache

    cache = TokenCache(str(cache_dir))
    d = {"chosen": [], "rejected": []}
    for k in cache._keys:
        vals = cache.values(format(int(k), "016x"))
        for side in d:
            d[side].append(np.asarray(vals[f"{side}_token_values"], np.float64))
    out = {}
    for side, sign in (("chosen", 1.0), ("rejected", -1.0)):
        x = np.concatenate(d[side])
        out[f"d {side}"] = float(x.mean())
        out[f"w {side}"] = float(np.exp(sign * np.clip(x, -1.0, 1.0)).mean())
    return out


# ---- statistics and verdicts (rules: docs/experiments.md §7) --------------------------------------------


def both_intervals(diffs: Sequence[Items]) -> tuple[Interval, Interval]:
    """A paired per-seed difference: (seed-level t-interval of the per-seed means, two-level bootstrap)."""
    return t_interval([float(d) for d in diffs]), items_interval(list(diffs), n_boot=2000)


def above(ivs: tuple[Interval, Interval]) -> bool:
    return all(iv.n > 1 and iv.lo > 0 for iv in ivs)


def below(ivs: tuple[Interval, Interval]) -> bool:
    return all(iv.n > 1 and iv.hi < 0 for iv in ivs)


def fmt_iv(ivs: tuple[Interval, Interval]) -> str:
    t, b = ivs
    return f"{t.mean:+.4f} t[{t.lo:+.4f}, {t.hi:+.4f}] b[{b.lo:+.4f}, {b.hi:+.4f}]"


def verdict(diff: dict[str, dict[int, tuple[Interval, Interval]]], sizes: Sequence[int]) -> tuple[str, str]:
    """The rule of docs/experiments.md §7 on one task's gold-score differences."""
    premise = above(diff["dpo-sft"][max(sizes)])
    b_wins = [n for n in sizes if above(diff["tw_oracle-dpo"][n])]
    b_loses = [n for n in sizes if below(diff["tw_oracle-dpo"][n])]
    order_bad = [
        f"{k} at n={n}"
        for k in ("tw_true-tw_oracle", "tw_oracle-tw_uniform")
        for n in sizes
        if below(diff[k][n])
    ]
    a_wins = [n for n in sizes if above(diff["tw_true-dpo"][n])]
    why = (
        f"(b) above DPO at n={b_wins or 'none'}, below at n={b_loses or 'none'}; ordering violations: "
        f"{order_bad or 'none'}; (a) above DPO at n={a_wins or 'none'}"
    )
    if not premise:
        return (
            "inconclusive",
            "premise fails: DPO's gold is not above the SFT reference's at the largest n; " + why,
        )
    if b_wins and not b_loses and not order_bad:
        return "holds", why
    if b_wins or a_wins:
        return "partly", why
    return "does not hold", why


def analyse(
    evals: dict[int, dict[int, dict[str, dict]]], sizes: Sequence[int], methods: Sequence[str]
) -> dict:
    """evals[seed][size][method] -> means with both intervals, paired differences, verdict inputs."""
    seeds = sorted(evals)
    out: dict[str, Any] = {"means": {}, "diff": {}}
    for metric in ("gold", "accuracy", "length"):
        out["means"][metric] = {}
        for m in ["sft", *methods]:
            for n in sizes:
                per = [Items.mean(evals[s][n][m][metric]) for s in seeds]
                out["means"][metric][(m, n)] = (
                    t_interval([float(x) for x in per]),
                    items_interval(per, n_boot=2000),
                )
        pairs = [("dpo", "sft")] + [(m, "dpo") for m in methods if m != "dpo"]
        pairs += [("tw_true", "tw_oracle"), ("tw_oracle", "tw_uniform")]
        out["diff"][metric] = {}
        for a, b in pairs:
            if a in [*methods, "sft"] and b in [*methods, "sft"]:
                out["diff"][metric][f"{a}-{b}"] = {
                    n: both_intervals(
                        [
                            Items.mean(evals[s][n][a][metric]) - Items.mean(evals[s][n][b][metric])
                            for s in seeds
                        ]
                    )
                    for n in sizes
                }
    return out


# ---- report -----------------------------------------------------------------------------------------------


def figure(stats: dict[str, dict], sizes: Sequence[int], methods: Sequence[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stats), figsize=(5.5 * len(stats), 4), squeeze=False)
    for ax, (task, st) in zip(axes[0], stats.items(), strict=True):
        for m in methods:
            ivs = [st["means"]["gold"][(m, n)][0] for n in sizes]
            mean = [iv.mean for iv in ivs]
            ax.errorbar(
                sizes,
                mean,
                yerr=[[iv.mean - iv.lo for iv in ivs], [iv.hi - iv.mean for iv in ivs]],
                label=METHODS[m][0],
                capsize=3,
                marker="o",
                linestyle="--" if m == "tw_uniform" else "-",  # = DPO, run for run: dashed over it
            )
        sft = st["means"]["gold"][("sft", sizes[0])][0].mean
        ax.axhline(sft, color="grey", linestyle=":", label=LABELS["sft"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training pairs")
        ax.set_ylabel(f"held-out gold score ({TASKS[task][1]})")
        ax.set_title(task)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def weight_lines(root: Path, seeds: Sequence[int], sizes: Sequence[int]) -> list[str]:
    """Table lines: what the TIS transform makes of each rewards cache (means over seeds)."""
    lines = [
        "",
        "TIS weights from the caches (training pairs; mean over tokens, then seeds): d is the cached "
        "reward, w = exp(±clamp(d, −1, 1)) (+ chosen, − rejected):",
        "",
        "| cache | n | d chosen | d rejected | w chosen | w rejected |",
        "|---|---|---|---|---|---|",
    ]
    for kind in ("true", "oracle"):
        for n in sizes:
            rows = [
                weight_stats(c)
                for s in seeds
                if (c := root / f"seed{s}" / f"n{n}" / f"cache_{kind}").exists()
            ]
            if rows:
                m = {k: np.mean([r[k] for r in rows]) for k in rows[0]}
                lines.append(
                    f"| {kind} | {n} | {m['d chosen']:+.3f} | {m['d rejected']:+.3f} | "
                    f"{m['w chosen']:.3f} | {m['w rejected']:.3f} |"
                )
    return lines


def write_report(args, scale, stats, verdicts, times, started: str, md: Path) -> None:
    sizes, methods = scale["sizes"], args.methods
    name = args.scale or ("quick" if args.quick else "full")
    lines = [
        f"# Experiment 7: does credit assignment pay off in training? ({name})",
        "",
        "Written by `python -m dpoq_jax.experiments.token_training` (rules: docs/experiments.md §7, "
        "dated 2026-12-07 before the first run). Intervals: `t[...]` = 95% Student-t over seeds "
        "(df = seeds − 1), `b[...]` = 95% two-level bootstrap (seeds, then held-out items); a "
        "difference counts only when both lie on one side of 0.",
        "",
    ]
    for task, st in stats.items():
        lines += [
            f"## {task}",
            "",
            f"Gold score: {TASKS[task][1]} generations on {scale['n_eval']} held-out "
            "prompts; accuracy: implicit reward β log π/π_SFT of chosen > rejected on the held-out pairs.",
            "",
            "| method | "
            + " | ".join(f"gold n={n}" for n in sizes)
            + " | "
            + " | ".join(f"accuracy n={n}" for n in sizes)
            + " |",
            "|---|" + "---|" * (2 * len(sizes)),
        ]
        for m in ["sft", *methods]:
            g = [st["means"]["gold"][(m, n)] for n in sizes]
            a = [st["means"]["accuracy"][(m, n)] for n in sizes]
            cells = [
                f"{t.mean:.4f} t[{t.lo:.4f}, {t.hi:.4f}] b[{b.lo:.4f}, {b.hi:.4f}]"
                if math.isfinite(t.mean)
                else "—"
                for t, b in g + a
            ]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired differences of the gold score (same seed, SFT model, pairs and prompts):",
            "",
            "| difference | " + " | ".join(f"n={n}" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for k, per_n in st["diff"]["gold"].items():
            lines.append(f"| {k} | " + " | ".join(fmt_iv(per_n[n]) for n in sizes) + " |")
        lines += [
            "",
            "Mean response length (tokens) of the generations:",
            "",
            "| method | " + " | ".join(f"n={n}" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for m in ["sft", *methods]:
            lines.append(
                f"| {LABELS[m]} | "
                + " | ".join(f"{st['means']['length'][(m, n)][0].mean:.2f}" for n in sizes)
                + " |"
            )
        lines += weight_lines(Path(args.workdir) / task, args.seeds, sizes)
        v, why = verdicts[task]
        lines += ["", f"**Verdict ({task}): {v}.** {why}", ""]
    lines += [
        f"![learning curves]({NAME}_figures/learning_curves.png)",
        "",
        "## Run",
        "",
        "|  |  |",
        "|---|---|",
    ]
    import jax

    meta = {
        "command": " ".join(["python -m dpoq_jax.experiments.token_training", *sys.argv[1:]]),
        "rules": RULES,
        "code commit": _git_commit(),
        "started": started,
        "finished": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu cores visible": str(__import__("os").cpu_count()),
        "jax": jax.__version__,
        "seeds": ", ".join(map(str, args.seeds)),
        "scale": json.dumps({k: v for k, v in scale.items() if k != "seeds"}),
        "seconds a (task, seed), when it ran: DPO-family training + evaluation (SFT not counted)": times,
    }
    lines += [f"| {k} | {v} |" for k, v in meta.items()]
    md.write_text("\n".join(lines) + "\n")
    numbers = {
        task: {
            "verdict": verdicts[task][0],
            "gold_diff": {
                k: {str(n): [iv.mean, iv.lo, iv.hi, b.lo, b.hi] for n, (iv, b) in per_n.items()}
                for k, per_n in st["diff"]["gold"].items()
            },
        }
        for task, st in stats.items()
    }
    md.with_suffix(".json").write_text(json.dumps(numbers, indent=1))


PILOT_LRS, PILOT_SEED, PILOT_SIZE = (1e-4, 3e-4, 1e-3), 100, 512


def pilot(args: argparse.Namespace, scale: dict, tasks: Sequence[str]) -> int:
    """The rules' lr pilot: DPO alone at n = 512 on seed 100 (not an evaluation seed) for each lr; writes
    gold (mean), accuracy and length of SFT and DPO to <results stem>_pilot.json."""
    out = {}
    for task in tasks:
        for lr in PILOT_LRS:
            a = argparse.Namespace(
                **{**vars(args), "workdir": f"{args.workdir}_pilot/lr{lr:g}", "methods": ["dpo"]}
            )
            ev = run_part(a, {**scale, "sizes": (PILOT_SIZE,), "lr": lr}, task, PILOT_SEED)[PILOT_SIZE]
            out[f"{task} lr {lr:g}"] = {
                m: {
                    k: float(np.nanmean(e[k])) if m != "sft" or k != "accuracy" else None
                    for k in ("gold", "accuracy", "length")
                }
                for m, e in ev.items()
            }
            log(f"pilot {task} lr {lr:g}: {out[f'{task} lr {lr:g}']}")
    path = Path(args.results).with_name(f"{NAME}_pilot.json")
    path.write_text(json.dumps(out, indent=1))
    log(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m dpoq_jax.experiments.token_training",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="the smoke scale (see SCALES)")
    p.add_argument("--scale", default=None, choices=tuple(SCALES), help="a scale by name (--quick: quick)")
    p.add_argument("--seeds", default=None, help="e.g. 0-4 or 3 (default: the scale's)")
    p.add_argument("--tasks", default=None, help="comma list of tasks (default: the scale's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list, dpo first")
    p.add_argument("--workdir", default=f"runs/experiments/{NAME}", help="training runs and caches")
    p.add_argument("--results", default=str(RESULTS / f"{NAME}.md"), help="the report (.md; .json beside)")
    p.add_argument("--no-report", action="store_true", help="run the parts only (e.g. one seed of a plan)")
    p.add_argument("--pilot", action="store_true", help="the lr pilot of the rules (DPO, seed 100, n 512)")
    args = p.parse_args(argv)
    scale = dict(SCALES[args.scale or ("quick" if args.quick else "full")])
    from dpoq_jax.experiments.harness import seed_list

    args.seeds = seed_list(args.seeds) if args.seeds else scale["seeds"]
    tasks = args.tasks.split(",") if args.tasks else list(scale["tasks"])
    args.methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in args.methods if m not in METHODS] + [t for t in tasks if t not in TASKS]
    if bad or args.methods[0] != "dpo":
        p.error(f"unknown methods/tasks {bad} (methods: {list(METHODS)}, dpo first; tasks: {list(TASKS)})")
    if args.pilot:
        return pilot(args, scale, tasks)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    evals: dict[str, dict[int, Any]] = {t: {} for t in tasks}
    times: list[str] = []
    for task in tasks:
        for s in args.seeds:
            evals[task][s] = run_part(args, scale, task, s)
            spent = sum(
                ev.get("train_seconds", 0) + ev.get("eval_seconds", 0)
                for n in scale["sizes"]
                for m, ev in evals[task][s][n].items()
                if m != "sft"
            )
            times.append(f"{task} seed {s}: {spent:.0f}")
    if args.no_report:
        return 0
    stats = {t: analyse(evals[t], scale["sizes"], args.methods) for t in tasks}
    verdicts = {t: verdict(stats[t]["diff"]["gold"], scale["sizes"]) for t in tasks}
    md = Path(args.results)
    figure(stats, scale["sizes"], args.methods, md.parent / f"{NAME}_figures" / "learning_curves.png")
    write_report(args, scale, stats, verdicts, "; ".join(times), started, md)
    for t in tasks:
        log(f"{t}: {verdicts[t][0]} ({verdicts[t][1]})")
    log(f"wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
