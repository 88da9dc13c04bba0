"""Training from token rewards on a real chat model: DPO beside TIS-weighted DPO, SePO and TDPO₂ on the
verifiable-constraint preferences of experiment 6 (docs/experiments.md §7, "the real-model run").

Per seed:
  1. the prompts of experiment 6 (topics × constraints) split per constraint into training, validation
     and test prompts; the training prompts split again in two halves by topic order: the oracle's and
     the policy's (the oracle never sees a policy prompt, as a user's oracle would be trained elsewhere);
  2. the model samples answers to every training and validation prompt; (kept, broken) pairs per prompt;
  3. the oracle: a DPO run of the model on the oracle's pairs; its implicit rewards log π_oracle/π_model
     on the policy's pairs written once as a token cache (`dpoq token-rewards`, β 1: TIS-DPO's d_t);
  4. from the model on the policy's pairs, same steps, lr and batches: DPO; token-weighted DPO with
     TIS-DPO weights from the oracle's cache; SePO at 30% of the tokens by the oracle's rewards
     (reference-free); TDPO₂ (α 0.5);
  5. on the test prompts: constraint satisfaction, finished answers and length (words) of greedy and
     sampled answers of the model and each run, paired per prompt against DPO and against the model;
     time per step of each run (median of the logged steps).
One seed is the plan (a descriptive run, no verdict rules): the intervals are over test prompts only.

    python -m dpoq_jax.experiments.token_training_real --model runs/smollm2 --seeds 0
    python -m dpoq_jax.experiments.token_training_real --model runs/smollm2 --quick   # a smoke run

Finished training runs, caches and seeds are reused (a stopped run restarts where it stopped).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.experiments import constraint_prefs as cp
from dpoq_jax.experiments import harness, runs

NAME = "token_training_real"
TASK = "constraint_prefs"
RESULTS = harness.RESULTS_DIR
# arm -> (label, loss overrides, reads the oracle's cache); dpo first (its config names the policy's data)
ARMS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "dpo": ("DPO", {"loss.loss_type": "sigmoid"}, False),
    "tw_oracle": ("TIS weights, DPO oracle", {"loss.loss_type": "token_weighted"}, True),
    "sepo_oracle": (
        "SePO 30%, DPO oracle",
        {"loss.loss_type": "selective", "loss.select_ratio": 0.3, "loss.beta": 2.0, "loss.simpo_gamma": 0.5},
        True,
    ),
    "tdpo2": (
        "TDPO₂ (α 0.5)",
        {"loss.loss_type": "tdpo", "loss.tdpo_variant": 2, "loss.tdpo_alpha": 0.5},
        False,
    ),
}
MODELS = {"ref": "the model (no training)", **{a: v[0] for a, v in ARMS.items()}}
COLUMNS = cp.GEN_COLUMNS
CONSTRAINTS = ("no_e", "no_comma", "lowercase", "no_digits", "no_word:the", "max_words:20")
# experiment 6's sizes and DPO settings (full weights: 50 steps at lr 5e-6, β 0.1, batch 8); the oracle
# trains as DPO does, on the other half of the training prompts
SCALES = {
    "full": dict(constraints=CONSTRAINTS, n_topics=40, n_val_topics=3, n_test_topics=6, n_samples=4,
                 max_new_tokens=48, batch=32, pairs_per_prompt=2, beta=0.1, batch_size=8, eval_every=25,
                 steps=50, lr=5e-6, n_gen_samples=2),
    "quick": dict(constraints=CONSTRAINTS, n_topics=12, n_val_topics=1, n_test_topics=2, n_samples=4,
                  max_new_tokens=48, batch=32, pairs_per_prompt=2, beta=0.1, batch_size=8, eval_every=4,
                  steps=8, lr=5e-6, n_gen_samples=1),
}  # fmt: skip


def halves(prompts: Sequence[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The training prompts of each constraint split alternately (in their seeded order) into the
    oracle's and the policy's: disjoint topics per constraint, every constraint in both."""
    out: dict[str, list[tuple[str, str]]] = {"oracle": [], "policy": []}
    seen: dict[str, int] = {}
    for p in prompts:
        k = seen.get(p[1], 0)
        seen[p[1]] = k + 1
        out["oracle" if k % 2 == 0 else "policy"].append(p)
    return out


def train_arm(
    args: argparse.Namespace, scale: dict, arm: str, train: Path, val: Path, cache: Path | None, name=""
) -> Path:
    """A run of `arm` from the model on the pairs in `train` in <workdir>/<name or arm> (the oracle: the
    dpo arm on its own pairs, named "oracle")."""
    label, loss, _ = ARMS[arm]
    over = dict(loss)
    beta = over.pop("loss.beta", scale["beta"])
    extra = [f"--config.model.path={Path(args.model).resolve()}", f"--config.data.path={train}",
             f"--config.data.eval_path={val}", f"--config.train.batch_size={scale['batch_size']}",
             *(f"--config.{k}={v}" for k, v in over.items()),
             *([f"--config.loss.token_weights={cache}"] if cache is not None else [])]  # fmt: skip
    doc.log(f"{NAME}: {name or label}: {scale['steps']} steps at lr {scale['lr']}, β = {beta}")
    return runs.train_run(args.config, "dpo", Path(args.workdir) / (name or arm), steps=scale["steps"],
                          seed=args.seed, beta=beta, lr=scale["lr"], eval_every=scale["eval_every"],
                          overrides=[*extra, *args.overrides])  # fmt: skip


def step_seconds(run_dir: Path) -> float:
    """Median wall time of the run's logged training steps, the first logged one left out (with
    log_every 1 it is the compiling step)."""
    from dpoq_jax.train.metrics import read_metrics

    ts = [float(r["step_time_s"]) for r in read_metrics(str(run_dir), split="train") if "step_time_s" in r]
    if not ts:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step_time_s")
    return float(np.median(ts[1:] if len(ts) > 1 else ts))


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: prompts, samples, pairs, the oracle and its cache, the arms, the held-out answers."""
    from dpoq_jax.analysis.seeds import Items
    from dpoq_jax.data.token_cache import is_cache
    from dpoq_jax.train.load import load_model, run_config
    from dpoq_jax.train.precompute import token_rewards

    if not args.model:
        raise SystemExit(f"{NAME}: --model is required (a Hugging Face chat model folder)")
    bad = [a for a in args.arms if a not in ARMS]
    if bad or not args.arms or args.arms[0] != "dpo":
        raise SystemExit(
            f"{NAME}: --arms {','.join(args.arms)}: unknown {bad} or not dpo first (arms: {list(ARMS)})"
        )
    t0 = time.time()
    chat, workdir = cp.Chat(args.model), Path(args.workdir)
    names = scale["constraints"]
    splits = cp.split_prompts(cp.TOPICS[: scale["n_topics"]], names, scale["n_val_topics"],
                              scale["n_test_topics"], args.seed)  # fmt: skip
    parts = {**halves(splits["train"]), "validation": splits["validation"]}
    ref = load_model(args.model)
    kw = dict(max_new=scale["max_new_tokens"], temperature=1.0, batch=scale["batch"])
    data, counts = {}, {}
    for i, (split, prompts) in enumerate(parts.items()):
        doc.log(f"{NAME}: sampling {scale['n_samples']} answers for {len(prompts)} {split} prompts")
        ss = chat.generate(ref, prompts, scale["n_samples"], seed=args.seed * 10 + i, **kw)
        rows, counts[split] = cp.pair_rows(prompts, ss, scale["pairs_per_prompt"], args.seed, split)
        data[split] = cp.write_rows(workdir / "data", split, rows)
    # the oracle: DPO on its own prompts, then its rewards on the policy's pairs (the dpo arm's data)
    oracle = train_arm(args, scale, "dpo", data["oracle"], data["validation"], None, name="oracle")
    dirs: dict[str, Path] = {}
    cache = workdir / "oracle_rewards"
    for arm in args.arms:
        if ARMS[arm][2] and not is_cache(str(cache)):
            doc.log(f"{NAME}: the oracle's token rewards on the {len(parts['policy'])} policy prompts' pairs")
            model = str(Path(args.model).resolve())
            token_rewards(run_config(str(dirs["dpo"])), str(oracle), model, str(cache), beta=1.0)
        dirs[arm] = train_arm(
            args, scale, arm, data["policy"], data["validation"], cache if ARMS[arm][2] else None
        )
    test = splits["test"]
    doc.log(f"{NAME}: held-out answers of {len(test)} test prompts (the model and {len(dirs)} runs)")
    q = {"ref": cp.satisfaction(chat, ref, test, scale, args.seed + 100)}
    for arm, d in dirs.items():
        q[arm] = cp.satisfaction(chat, load_model(str(d)), test, scale, args.seed + 100)
    secs = {arm: step_seconds(d) for arm, d in dirs.items()}
    report = doc.Report("Training from token rewards on a real model (constraint preferences)", intro=INTRO)
    setup_rows = [[split, sum(k["prompts"] for k in c.values()), sum(k["pairs"] for k in c.values())]
                  for split, c in counts.items()]  # fmt: skip
    report.add("Prompts and pairs", f"Constraints {', '.join(names)}; {len(test)} test prompts.",
               doc.Table(["split", "prompts", "pairs"], setup_rows))  # fmt: skip
    shown = ["ref", *dirs]
    rows = [[MODELS[k], how, *(q[k][how][c] for c in COLUMNS), secs.get(k, "–")]
            for k in shown for how in ("greedy", "sampled")]  # fmt: skip
    report.add(
        "Held-out answers",
        f"Greedy: temperature 0, one answer a test prompt; sampled: temperature 1, the mean of "
        f"{scale['n_gen_samples']} a prompt; at most {scale['max_new_tokens']} new tokens. Step: median "
        "seconds of the run's logged training steps.",
        doc.Table(["model", "decoding", *COLUMNS, "s / step"], rows),
    )
    numbers: dict[str, Any] = {}
    diff_rows = []
    for arm in dirs:
        for base in ("ref", "dpo"):
            if arm == base:
                continue
            for how in ("greedy", "sampled"):
                d = [q[arm][how][c] - q[base][how][c] for c in COLUMNS]
                diff_rows.append([f"{MODELS[arm]} − {MODELS[base]}", how, *d])
                numbers[f"{arm}-{base}/{how}/kept"] = d[0]
                numbers[f"{arm}-{base}/{how}/words"] = d[2]
    report.add(
        "Paired differences per test prompt", "", doc.Table(["difference", "decoding", *COLUMNS], diff_rows)
    )
    numbers |= {f"{arm}/s_per_step": Items.mean([secs[arm]]) for arm in dirs}
    report.numbers = numbers
    report.meta = harness.run_meta(args) | {"model": args.model, "arms": ", ".join(dirs)}
    report.run_dirs = {**dirs, "oracle": oracle}
    doc.log(f"{NAME}: seed {args.seed} done in {time.time() - t0:.0f} s")
    return report


INTRO = (
    "Question (beyond the paper): on a real chat model, does training from an oracle's token rewards "
    "(TIS-DPO weights, SePO's token selection) or with TDPO's per-token KL change constraint satisfaction, "
    "answer length or time per step against plain DPO on the same pairs? One seed, no verdict rules: "
    "descriptive; the synthetic learning curves of docs/experiments.md §7 carry the rules."
)


def verdicts(n: dict, scale: dict) -> dict[str, doc.Verdict]:
    """None: a descriptive run (docs/experiments.md §7)."""
    del n, scale
    return {}


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.set_defaults(config=str(cp.CONFIG))
    parser.add_argument("--model", default="", help="a Hugging Face chat model folder (e.g. runs/smollm2)")
    parser.add_argument("--arms", default=",".join(ARMS), type=lambda s: [a for a in s.split(",") if a],
                        help=f"training arms, dpo first (default: {','.join(ARMS)})")  # fmt: skip


def main(argv: Sequence[str] | None = None, scales: dict | None = None, results_dir=RESULTS) -> int:
    return harness.experiment_main(sys.modules[__name__], argv, scales, results_dir)


if __name__ == "__main__":
    sys.exit(main())
