"""Implicit process rewards from outcome labels only (issue #25; Yuan et al. 2024, built on Eq. 10).

On the arithmetic_chain task (steps written one per "|", each using the previous value, so an error at
step k makes every later value and the final answer wrong; step correctness known exactly), per seed:
  1. SFT a reference on solutions with errors at known rates (a wrapping step is wrong more often than
     right), so its samples make errors;
  2. sample candidates per training prompt from the reference and label each by its final answer only;
  3. train two implicit PRMs from the reference: DPO (β log π/π_ref) on (correct, incorrect) pairs of the
     same prompt, and the unpaired cross-entropy loss (`outcome_ce`) on every labelled candidate;
  4. on held-out prompts sample 64 candidates from the reference, cut them into steps (spec "|"), and
     score each step by the sum of its tokens' implicit rewards (dpoq_jax.prm).
Measured: step-error localisation (AUROC of −step reward for the first erroneous step against the
correct steps before it; ProcessBench-style first-error accuracy on wrong solutions, "no error" accuracy
on right ones, their harmonic mean, with the threshold chosen on validation prompts), and best-of-N
final-answer accuracy for N = 1, 4, 16, 64 by each aggregation (min, sum, last, mean, a weighted vote)
against the reference's likelihood, a majority vote and the oracle (any correct candidate). Intervals
are the wider of a two-level bootstrap (seeds, then held-out prompts) and the seed-level t-interval,
inside the statistic's range, comparisons paired differences per
seed and prompt; the verdict rules are in docs/experiments.md ("Process rewards"), written before runs.

    python -m dpoq_jax.experiments.process_rewards   # full, seeds 0-4 (≈ 13 min a seed, 2 CPU cores)
    python -m dpoq_jax.experiments.process_rewards --sweep --seeds 0   # the lr/steps sweep, one seed, first
    python -m dpoq_jax.experiments.process_rewards --dpo-lr 3e-4 --dpo-steps 600 --ce-lr 1e-3 --ce-steps 300
    python -m dpoq_jax.experiments.process_rewards --quick   # a smoke run (2 seeds)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis import seeds as seeds_lib
from dpoq_jax.analysis import text_steps as st
from dpoq_jax.analysis.credit import score_responses
from dpoq_jax.data.synthetic import STEP_DELIMITER, SyntheticTokenizer, make_task
from dpoq_jax.decode.core import strip_eos
from dpoq_jax.decode.sampling import sample_responses
from dpoq_jax.experiments import harness, runs
from dpoq_jax.prm import AGGREGATES, weighted_vote
from dpoq_jax.reward_model import token_credit, train_reward_model

NAME = "process_rewards"
TASK = "arithmetic_chain"
MODELS = {"dpo": "DPO (pairs)", "ce": "outcome CE (unpaired)"}
# explicit Bradley–Terry reward models (dpoq_jax.reward_model) on DPO's pairs, trained like the DPO PRM
# (added 2026-12-07): the token model's step reward is the sum of its r_t, the outcome model's the change
# of its prefix score over the step (so its sum is R(y) − o(x))
RMS = {"token_rm": "token BT reward model", "outcome_rm": "outcome BT reward model"}
RM_AGGREGATES = ("min", "sum")
SELECTORS = [f"{m}:{a}" for m in MODELS for a in (*AGGREGATES, "vote")] + [
    f"{m}:{a}" for m in RMS for a in RM_AGGREGATES] + [
    "reference likelihood", "reference likelihood per token", "majority vote", "oracle (any correct)",
    "random candidate"]  # fmt: skip
LOCALISERS = {"dpo": "DPO implicit step reward", "ce": "CE implicit step reward",
              "token_rm": "token BT reward model step reward",
              "outcome_rm": "outcome BT reward model step credit",
              "ref": "reference step log-likelihood", "position": "position (later step = more suspicious)",
              "random": "uniform random"}  # fmt: skip
SECTION = {
    "setup": "Task, reference and training data",
    "sweep": "DPO / CE learning-rate and steps sweep (validation prompts)",
    "loc": "Step-error localisation",
    "bon": "Best-of-N final-answer accuracy",
    "diff": "Paired differences: min aggregation against the baselines",
}
CLAIM_LOC = "implicit step rewards localise errors without step labels"
CLAIM_BON = "the min-aggregated implicit PRM beats outcome-only and likelihood reranking at N ≥ 16"
RAW_FILE = "process_rewards_raw.pkl"


# ------------------------------------------------------------------------------------------ data


def sample_candidates(
    model: Any, prompts: Sequence[str], n: int, seed: int, max_new: int, chunk: int = 1024
) -> list[list[list[int]]]:
    """n reference samples per prompt (temperature 1), in fixed-size chunks (one compiled shape)."""
    tok = SyntheticTokenizer()
    flat = [tok.encode(p) for p in prompts for _ in range(n)]
    out: list[list[int]] = []
    for i, s in enumerate(range(0, len(flat), chunk)):
        part = flat[s : s + chunk]
        pad = part + [part[0]] * (min(chunk, len(flat)) - len(part))
        out += sample_responses(model, pad, max_new_tokens=max_new, seed=seed * 1000 + i)[: len(part)]
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


@dataclasses.dataclass(frozen=True)
class IdPair:
    """A preference pair as token ids (what dpoq_jax.reward_model trains on)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def text_of(ids: Sequence[int]) -> str:
    return SyntheticTokenizer().decode(strip_eos(ids, SyntheticTokenizer.eos_token_id))


def training_rows(
    task: Any,
    prompts: Sequence[str],
    cands: Sequence[Sequence[Sequence[int]]],
    pairs_per_prompt: int,
    seed: int,
) -> tuple[list[dict], list[dict], dict[str, float], list[IdPair]]:
    """(DPO pair rows, outcome rows, stats, the pairs as sampled token ids) from final-answer labels only.
    Candidates whose text holds a special token or is empty are left out (they cannot be written as text
    rows)."""
    rng = np.random.default_rng([seed, 25])
    tok = SyntheticTokenizer()
    pairs, rows, oks, id_pairs = [], [], [], []
    for p, cs in zip(prompts, cands, strict=True):
        good, bad = [], []
        for ids in cs:
            text = text_of(ids)
            if not text or "<" in text:
                continue
            ok = task.check_solution(p, text).correct
            (good if ok else bad).append((text, list(ids)))
            rows.append({"prompt": p, "completion": text, "label": bool(ok)})
            oks.append(float(ok))
        rng.shuffle(good)
        rng.shuffle(bad)
        for (g, g_ids), (b, b_ids) in list(zip(good, bad, strict=False))[:pairs_per_prompt]:
            pairs.append({"prompt": p, "chosen": g, "rejected": b})
            id_pairs.append(IdPair(tok.encode(p), g_ids, b_ids))
    # rates as per-item statistics (intervals inside [0, 1] once merged); a problem repeated in several
    # prompt slots counts once, so "prompts with a pair" can reach 1 (the slot count capped it at 1/8)
    paired = {r["prompt"] for r in pairs}
    share = seeds_lib.Items.mean
    stats = {"candidates": len(oks), "correct share": share(oks or [0.0]), "pairs": len(pairs),
             "prompts with a pair": share([p in paired for p in dict.fromkeys(prompts)])}  # fmt: skip
    return pairs, rows, stats, id_pairs


def write_rows(folder: Path, stem: str, rows: list[dict]) -> Path:
    """rows as JSON lines in folder/<stem>_<content hash>.jsonl: a run trained on other rows is another
    run (train_run compares settings, and the path is one of them)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path = folder / f"{stem}_{hashlib.sha1(text.encode()).hexdigest()[:10]}.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(text)
    return path


def tokenizer_dir(workdir: Path) -> Path:
    """The synthetic tokenizer as Hugging Face files (the jsonl source reads text through one)."""
    d = workdir / "tokenizer"
    if not (d / "tokenizer.json").exists():
        SyntheticTokenizer().save_pretrained(str(d))
    return d


# ------------------------------------------------------------------------------------ evaluation


def evaluate(
    task: Any,
    prompts: Sequence[str],
    cands: Sequence[Sequence[Sequence[int]]],
    policies: dict[str, Any],
    ref: Any,
    beta: float,
    rms: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-candidate and per-step facts and scores of every candidate (numpy, per split); `rms`: the
    explicit reward models by RMS key, scored like the PRMs (their per-token credit in place of r_t).

    Candidates: prompt index, correct, answer, first error (−1: none), aggregated scores of each policy
    (min, sum, last, mean), reference log-likelihood. Steps: candidate index, step index, label (first
    error), whether it counts for localisation (steps up to and including the first error), score
    (higher = more likely erroneous) of each localiser."""
    tok, pattern = SyntheticTokenizer(), st.parse_spec(STEP_DELIMITER)
    flat_p = [tok.encode(p) for p, cs in zip(prompts, cands, strict=True) for _ in cs]
    flat_r = [list(ids) if len(ids) else [tok.eos_token_id] for cs in cands for ids in cs]
    prompt_idx = np.repeat(np.arange(len(prompts)), [len(cs) for cs in cands])
    out: dict[str, Any] = {"prompt": prompt_idx}
    segs = None
    for m, pol in policies.items():
        scores = score_responses(pol, ref, flat_p, flat_r, beta, batch_size=256)
        if segs is None:
            segs = [st.segment(tok, s.ids, pattern) for s in scores]
            out["ref_loglik"] = np.array([float(np.sum(s.ref_logps, dtype=np.float64)) for s in scores])
            out["ref_loglik_mean"] = out["ref_loglik"] / np.maximum([len(s.ref_logps) for s in scores], 1)
            ref_steps = [[float(np.sum(s.ref_logps[a:b])) for a, b in g.ranges]
                         for s, g in zip(scores, segs, strict=True)]
        vals = st.step_values(scores, segs)
        for how in AGGREGATES:
            out[f"{m}:{how}"] = np.array([v[how] for v in vals])
        out[f"steps:{m}"] = [v["rewards"] for v in vals]
    for m, rm in (rms or {}).items():
        credit = token_credit(rm, flat_p, [s.ids for s in scores])
        as_scores = [dataclasses.replace(s, rewards=c) for s, c in zip(scores, credit, strict=True)]
        vals = st.step_values(as_scores, segs)
        for how in RM_AGGREGATES:
            out[f"{m}:{how}"] = np.array([v[how] for v in vals])
        out[f"steps:{m}"] = [v["rewards"] for v in vals]
    checks = [task.check_steps(prompts[i], g.texts) for i, g in zip(prompt_idx, segs, strict=True)]
    out["correct"] = np.array([c.correct for c in checks])
    out["answer"] = [None if c.answer is None else str(c.answer) for c in checks]
    out["first_error"] = np.array([-1 if c.first_error is None else c.first_error for c in checks])
    out["n_steps"] = np.array([len(g.ranges) for g in segs])
    # localisation steps: up to and including the first error (later steps continue from a wrong value:
    # neither plainly right nor the error)
    rng = np.random.default_rng(0)
    cand, label, score = [], [], {k: [] for k in LOCALISERS}
    for i, c in enumerate(checks):
        last = c.first_error if c.first_error is not None else len(segs[i].ranges) - 1
        for k in range(min(last, len(segs[i].ranges) - 1) + 1):
            cand.append(i)
            label.append(k == c.first_error)
            for m in (*policies, *(rms or {})):
                score[m].append(-out[f"steps:{m}"][i][k])
            score["ref"].append(-ref_steps[i][k])
            score["position"].append(float(k))  # the scored steps end at the first error, if any
            score["random"].append(rng.random())
    out["step_cand"], out["step_label"] = np.array(cand, np.int64), np.array(label, bool)
    out["step_score"] = {k: np.array(v) for k, v in score.items() if v}
    out["cand_steps"] = {m: out.pop(f"steps:{m}") for m in (*policies, *(rms or {}))}
    out["cand_steps"]["ref"] = [[-x for x in r] for r in ref_steps]  # as "rewards": low = bad
    return out


def best_of_n(
    ev: dict[str, Any], n_prompts: int, ns: Sequence[int], repeats: int, seed: int
) -> dict[str, dict[int, np.ndarray]]:
    """{selector: {N: per-prompt accuracy}}: N of a prompt's candidates drawn `repeats` times (all of them
    once when N is their number), the same subsets for every selector (paired comparisons)."""
    rng = np.random.default_rng([seed, 64])
    acc = {s: {n: np.zeros(n_prompts) for n in ns} for s in SELECTORS}
    for p in range(n_prompts):
        idx = np.flatnonzero(ev["prompt"] == p)
        for n in ns:
            subsets = [idx] if n >= len(idx) else [rng.choice(idx, n, replace=False) for _ in range(repeats)]
            for sub in subsets:
                ok = ev["correct"][sub]
                answers = [ev["answer"][i] for i in sub]
                picks = {}
                for m in (m for m in MODELS if f"{m}:min" in ev):
                    for how in AGGREGATES:
                        picks[f"{m}:{how}"] = int(np.argmax(ev[f"{m}:{how}"][sub]))
                    picks[f"{m}:vote"] = weighted_vote(answers, ev[f"{m}:min"][sub], "sigmoid")[0]
                for m in (m for m in RMS if f"{m}:min" in ev):
                    for how in RM_AGGREGATES:
                        picks[f"{m}:{how}"] = int(np.argmax(ev[f"{m}:{how}"][sub]))
                picks["reference likelihood"] = int(np.argmax(ev["ref_loglik"][sub]))
                picks["reference likelihood per token"] = int(np.argmax(ev["ref_loglik_mean"][sub]))
                picks["majority vote"] = weighted_vote(answers, ev["ref_loglik"][sub], "count")[0]
                for s, j in picks.items():
                    acc[s][n][p] += ok[j] / len(subsets)
                acc["oracle (any correct)"][n][p] += float(ok.any()) / len(subsets)
                acc["random candidate"][n][p] += float(ok.mean()) / len(subsets)
    return acc


def first_error_preds(cand_steps: Sequence[Sequence[float]], tau: float) -> np.ndarray:
    """ProcessBench-style prediction: the first step whose reward is below −tau (−1: none)."""
    out = np.full(len(cand_steps), -1)
    for i, r in enumerate(cand_steps):
        below = np.flatnonzero(-np.asarray(r) > tau)
        if below.size:
            out[i] = below[0]
    return out


def processbench_items(ev: dict[str, Any], key: str, tau: float) -> dict[str, np.ndarray]:
    """Per candidate: hit on erroneous solutions (pred = first error), hit on error-free ones (pred =
    none), each NaN where it does not apply."""
    pred = first_error_preds(ev["cand_steps"][key], tau)
    fe = ev["first_error"]
    err = fe >= 0
    return {"err_hit": np.where(err, pred == fe, np.nan), "ok_hit": np.where(~err, pred < 0, np.nan)}


def tune_tau(ev: dict[str, Any], key: str) -> float:
    """The threshold that maximises the harmonic mean of the two accuracies on these candidates."""
    scores = np.concatenate([-np.asarray(r, np.float64) for r in ev["cand_steps"][key] if len(r)])
    grid = np.unique(np.quantile(scores, np.linspace(0.0, 1.0, 101)))
    best, best_f1 = float(grid[-1]), -1.0
    for tau in grid:
        it = processbench_items(ev, key, float(tau))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # no solution of one kind: NaN
            a, b = np.nanmean(it["err_hit"]), np.nanmean(it["ok_hit"])
        f1 = 0.0 if not np.isfinite(a + b) or a + b == 0 else 2 * a * b / (a + b)
        if f1 > best_f1:
            best, best_f1 = float(tau), f1
    return best


def sweep_row(ev: dict[str, Any], m: str, n_prompts: int, seed: int) -> list[float]:
    """Validation numbers of one trained PRM: outcome AUROC (candidate sum reward vs correct), step
    AUROC, best-of-16 accuracy with min."""
    from dpoq_jax.analysis.stats import auroc

    out_auc = auroc(ev[f"{m}:sum"], ev["correct"]) if 0 < ev["correct"].mean() < 1 else float("nan")
    step_auc = (
        auroc(ev["step_score"][m], ev["step_label"]) if 0 < ev["step_label"].mean() < 1 else float("nan")
    )
    bon = best_of_n(ev, n_prompts, (16,), 4, seed)[f"{m}:min"][16].mean()
    return [float(out_auc), float(step_auc), float(bon)]


# ------------------------------------------------------------------------------------------ one seed


def train_prm(
    args: argparse.Namespace,
    m: str,
    data: Path,
    tok_dir: Path,
    sft_dir: Path,
    lr: float,
    steps: int,
    beta: float,
    tag: str = "",
) -> Path:
    extra = ["--config.data.source=jsonl", f"--config.data.path={data}",
             f"--config.data.tokenizer_path={tok_dir}",
             "--config.data.num_examples=0", f"--config.optim.lr={lr}"]  # fmt: skip
    if m == "ce":
        extra.append("--config.loss.loss_type=outcome_ce")
    return runs.train_run(args.config, "dpo", Path(args.workdir) / f"{m}_lr{lr}_steps{steps}{tag}",
                          steps=steps, seed=args.seed, beta=beta, init_from=sft_dir,
                          overrides=[*args.overrides, *extra])  # fmt: skip


def run(args: argparse.Namespace, scale: dict) -> doc.Report:
    """One seed: SFT, sample and label, train the two PRMs (and the sweep if asked), evaluate; the
    per-item results go to <workdir>/process_rewards_raw.pkl for the intervals over seeds and items."""
    from dpoq_jax.train.load import load_model

    runs.require_synthetic(args.config, args.overrides, TASK, NAME)
    t0 = time.time()
    workdir = Path(args.workdir)
    task = make_task(TASK, seed=args.seed)
    max_new = task.max_response_tokens + 2
    doc.log(f"{NAME}: SFT reference ({scale['sft_steps']} steps) in {workdir / 'sft_chosen'}")
    sft_dir = runs.train_sft(args, "chosen", scale["sft_steps"])
    ref = load_model(str(sft_dir))
    train_prompts = task.prompts(scale["n_train_prompts"], "train")
    doc.log(f"{NAME}: sampling {scale['n_train_cands']} candidates for {len(train_prompts)} training prompts")
    cands = sample_candidates(ref, train_prompts, scale["n_train_cands"], args.seed, max_new)
    pairs, rows, stats, id_pairs = training_rows(task, train_prompts, cands, scale["pairs_per_prompt"],
                                                 args.seed)
    data_dir, tok_dir = workdir / "data", tokenizer_dir(workdir)
    if not pairs or not any(r["label"] for r in rows):
        raise RuntimeError(
            f"{NAME}: no (correct, incorrect) pair among the reference's {stats['candidates']} "
            "training samples: train the reference longer (sft_steps) or sample more"
        )
    files = {"dpo": write_rows(data_dir, "pairs", pairs), "ce": write_rows(data_dir, "outcome", rows)}
    beta = scale["beta"]
    hp = {m: (getattr(args, f"{m}_lr", None) or scale[m]["lr"], getattr(args, f"{m}_steps", None)
              or scale[m]["steps"]) for m in MODELS}  # fmt: skip
    pols = {}
    for m in MODELS:
        doc.log(f"{NAME}: {MODELS[m]} at lr {hp[m][0]}, {hp[m][1]} steps, β = {beta}")
        pols[m] = load_model(str(train_prm(args, m, files[m], tok_dir, sft_dir, *hp[m], beta)))
    # the explicit reward models: DPO's pairs, steps, lr and batch size, from the same SFT network
    rm_batch = runs.peek_config(args.config, "dpo", args.overrides).train.batch_size
    rms = {}
    for m in RMS:
        kind = m.removesuffix("_rm")
        doc.log(f"{NAME}: {RMS[m]} on the {len(id_pairs)} pairs, lr {hp['dpo'][0]}, {hp['dpo'][1]} steps")
        rms[m] = train_reward_model(sft_dir, id_pairs, kind=kind, steps=hp["dpo"][1], lr=hp["dpo"][0],
                                    batch_size=rm_batch, seed=args.seed,
                                    cache_dir=workdir / "reward_models")  # fmt: skip
    # validation: thresholds of the first-error prediction (and the sweep)
    val_prompts = task.prompts(scale["n_val_prompts"], "validation")
    val_cands = sample_candidates(ref, val_prompts, scale["n_val_cands"], args.seed + 10_000, max_new)
    ev_val = evaluate(task, val_prompts, val_cands, pols, ref, beta, rms)
    taus = {k: tune_tau(ev_val, k) for k in (*MODELS, *RMS, "ref")}
    sweep = []
    if getattr(args, "sweep", False):
        for lr, steps in scale["sweep"]:
            for m in MODELS:
                doc.log(f"{NAME}: sweep {MODELS[m]} lr {lr} steps {steps}")
                pol = load_model(str(train_prm(args, m, files[m], tok_dir, sft_dir, lr, steps, beta)))
                ev = evaluate(task, val_prompts, val_cands, {m: pol}, ref, beta)
                sweep.append([MODELS[m], lr, steps, *sweep_row(ev, m, len(val_prompts), args.seed)])
    # test
    test_prompts = task.prompts(scale["n_test_prompts"], "test")
    doc.log(f"{NAME}: {scale['n_test_cands']} candidates for {len(test_prompts)} held-out prompts, scoring")
    test_cands = sample_candidates(ref, test_prompts, scale["n_test_cands"], args.seed + 20_000, max_new)
    ev = evaluate(task, test_prompts, test_cands, pols, ref, beta, rms)
    ns = tuple(n for n in scale["ns"] if n <= scale["n_test_cands"])
    bon = best_of_n(ev, len(test_prompts), ns, scale["bon_repeats"], args.seed)
    pb = {k: processbench_items(ev, k, taus[k]) for k in (*MODELS, *RMS, "ref")}
    raw = {"ev": {k: ev[k] for k in ("prompt", "correct", "first_error", "step_cand", "step_label",
                                     "step_score")},
           "bon": bon, "pb": pb, "taus": taus, "sweep": sweep, "ns": ns, "stats": stats,
           "n_prompts": len(test_prompts)}  # fmt: skip
    (workdir / RAW_FILE).write_bytes(pickle.dumps(raw))
    ref_err = float(np.mean(ev["first_error"] >= 0))
    doc.log(
        f"{NAME}: seed {args.seed} done in {time.time() - t0:.0f} s; held-out reference samples "
        f"correct {ev['correct'].mean():.3f}, with a step error {ref_err:.3f}"
    )
    report = doc.Report("Implicit process rewards from outcome labels (issue #25)", intro=INTRO)
    for key, title in SECTION.items():
        if key == "sweep" and not sweep:
            continue
        hp_text = "; ".join(f"{MODELS[m]} lr {lr}, {n} steps" for m, (lr, n) in hp.items())
        report.add(title, SECTION_TEXT[key].format(**{**scale, "hp": hp_text}))
    report.numbers = {"ref_correct": float(ev["correct"].mean()), "ref_step_error": ref_err,
                      **{f"train/{k}": float(v) for k, v in stats.items()}}  # fmt: skip
    report.meta = harness.run_meta(args)
    report.run_dirs = {"sft": sft_dir}
    return report


INTRO = (
    "Claims (issue #25, after Yuan et al. 2024): an implicit PRM, trained with final-answer labels only "
    "(DPO on correct vs incorrect candidates, or the unpaired cross-entropy loss), gives step rewards "
    "(the sum of a step's token rewards β log π/π_ref) that (1) localise the erroneous step without step "
    "labels and (2), aggregated by their minimum, pick better answers from N reference samples than the "
    "outcome reward (sum), a majority vote and the reference's likelihood, at N ≥ 16. The arithmetic_chain "
    "task knows every step's correctness exactly; the reference errs at wrapping steps more often than not, "
    "so its likelihood and a vote are misled."
)
SECTION_TEXT = {
    "setup": (
        "SFT reference: {sft_steps} steps on solutions with errors at known rates; {n_train_cands} "
        "candidates sampled (T = 1) for each of {n_train_prompts} training prompts, labelled by their final "
        "answer; DPO on up to {pairs_per_prompt} (correct, incorrect) pairs a prompt, outcome CE on every "
        "labelled candidate; β = {beta}; {hp}. Held-out: {n_test_prompts} test prompts × "
        "{n_test_cands} candidates; thresholds on {n_val_prompts} validation prompts × {n_val_cands}."
    ),
    "sweep": (
        "Each PRM retrained at each (lr, steps) and evaluated on the validation candidates: outcome AUROC "
        "(candidate summed reward vs its final answer being right), step AUROC, best-of-16 accuracy with "
        "min. "
        "The main runs use the (lr, steps) of the setup; the rule to choose them is in docs/experiments.md."
    ),
    "loc": (
        "Steps up to and including the first erroneous one (later steps continue from a wrong value). "
        "AUROC: the first erroneous step against the correct steps before it, scored by −(step reward) "
        "(reference: −step log-likelihood). First-error accuracy: the predicted first error (the first step "
        "whose score exceeds a threshold tuned on validation for the harmonic mean) equals the true one, on "
        "solutions with an error; no-error accuracy: nothing predicted, on solutions without; F1: their "
        "harmonic mean."
    ),
    "bon": (
        "Final-answer accuracy of the candidate chosen from N of a prompt's {n_test_cands} (drawn "
        "{bon_repeats} times per prompt, all once at N = {n_test_cands}; the same draws for every selector). "
        "`m:how`: highest aggregated step reward; `m:vote`: answers weighted by Σ sigmoid(min step reward); "
        "majority vote: by count; oracle: any candidate correct; random: the share of correct candidates."
    ),
    "diff": (
        "Per seed and prompt, accuracy of `m:min` minus each baseline on the same draws; intervals of the "
        "paired difference."
    ),
}


# ------------------------------------------------------------------------------ tables and verdicts


def weighted_auroc_stat(raws: Sequence[dict], key: str):
    """bootstrap stat: seed s's AUROC of step scores under prompt weights (pooled weighted steps)."""
    prep = []
    for r in raws:
        ev = r["ev"]
        if key not in ev["step_score"]:
            prep.append(None)
            continue
        score, label = ev["step_score"][key], ev["step_label"]
        prompt_of_step = ev["prompt"][ev["step_cand"]]
        u, inv = np.unique(score, return_inverse=True)
        prep.append((label, prompt_of_step, inv, len(u)))

    def stat(s: int, W: np.ndarray) -> np.ndarray:
        if prep[s] is None:
            return np.full(len(W), np.nan)
        label, pos_prompt, inv, G = prep[s]
        out = np.empty(len(W))
        for b, w in enumerate(W):
            ws = w[pos_prompt]
            pos = np.bincount(inv, ws * label, G)
            neg = np.bincount(inv, ws * ~label, G)
            below = np.cumsum(neg) - neg
            tot = pos.sum() * neg.sum()
            out[b] = np.sum(pos * (below + 0.5 * neg)) / tot if tot > 0 else np.nan
        return out

    return stat


def ratio_stat(raws: Sequence[dict], get) -> Any:
    """bootstrap stat: seed s's mean of per-candidate (or per-prompt) values (NaN = not applicable)
    under prompt weights."""
    prep = []
    for r in raws:
        x = np.asarray(get(r), np.float64)  # per candidate, or per prompt (best-of-N accuracies)
        prep.append((x, r["ev"]["prompt"] if len(x) != r["n_prompts"] else np.arange(r["n_prompts"])))

    def stat(s: int, W: np.ndarray) -> np.ndarray:
        x, prompt = prep[s]
        ok = np.isfinite(x)
        ws = W[:, prompt[ok]]
        with np.errstate(all="ignore"):
            return (ws @ x[ok]) / ws.sum(axis=1)

    return stat


def harmonic_stat(a, b):
    def stat(s: int, W: np.ndarray) -> np.ndarray:
        x, y = a(s, W), b(s, W)
        with np.errstate(all="ignore"):
            return np.where(x + y > 0, 2 * x * y / (x + y), 0.0)

    return stat


def build_tables(report: doc.Report, raws: Sequence[dict], n_boot: int) -> dict[str, seeds_lib.Interval]:
    """Fill the merged report's sections with tables of intervals (each the wider of the two-level
    bootstrap and the seed-level t-interval, inside the statistic's range); returns the intervals the
    verdicts read."""
    n_items = [r["n_prompts"] for r in raws]

    def boot(stat, bounds=(0.0, 1.0)):  # rates and AUROCs; their differences: bounds (−1, 1)
        return seeds_lib.wider_stat_interval(stat, n_items, bounds, n_boot=n_boot)

    sections = {s.title: s for s in report.sections}
    numbers: dict[str, seeds_lib.Interval] = {}
    stats_rows = [[k, seeds_lib.merge_number([r["stats"][k] for r in raws])] for k in raws[0]["stats"]]
    tau_rows = [[LOCALISERS[k], seeds_lib.t_interval([r["taus"][k] for r in raws])] for k in raws[0]["taus"]]
    ref_ok = boot(ratio_stat(raws, lambda r: r["ev"]["correct"].astype(float)))
    ref_err = boot(ratio_stat(raws, lambda r: (r["ev"]["first_error"] >= 0).astype(float)))
    sections[SECTION["setup"]].items += [
        doc.Table(["training data (from the reference's samples)", "value"], stats_rows),
        doc.Table(["held-out reference samples", "share"],
                  [["final answer correct", ref_ok], ["with a step error", ref_err]]),
    ]  # fmt: skip
    if raws[0]["sweep"]:
        merged = seeds_lib.merge_tables(
            [
                doc.Table(
                    ["PRM", "lr", "steps", "outcome AUROC", "step AUROC", "best-of-16 (min)"], r["sweep"]
                )
                for r in raws
            ]
        )
        sections[SECTION["sweep"]].items.append(merged)
    loc_rows = []
    for k, name in LOCALISERS.items():
        auc = boot(weighted_auroc_stat(raws, k))
        numbers[f"auroc/{k}"] = auc
        if k in raws[0]["pb"]:
            e = ratio_stat(raws, lambda r, k=k: r["pb"][k]["err_hit"])
            o = ratio_stat(raws, lambda r, k=k: r["pb"][k]["ok_hit"])
            loc_rows.append([name, auc, boot(e), boot(o), boot(harmonic_stat(e, o))])
        else:
            loc_rows.append([name, auc, "", "", ""])
    diff_rows = []
    for m in MODELS:
        bases = [("ref", f"auroc_diff/{m}"), ("position", f"auroc_diff_pos/{m}")]
        bases += [(k, f"auroc_diff_{k}/{m}") for k in RMS if k in raws[0]["ev"]["step_score"]]  # reported
        for base, key in bases:
            d = auroc_diff_stat(weighted_auroc_stat(raws, m), weighted_auroc_stat(raws, base))
            numbers[key] = boot(d, (-1.0, 1.0))
            diff_rows.append([f"AUROC: {LOCALISERS[m]} − {LOCALISERS[base]}", "", numbers[key]])
    sections[SECTION["loc"]].items += [
        doc.Table(["step scorer", "AUROC", "first-error acc. (wrong solutions)", "no-error acc. (right ones)",
                   "F1 (harmonic mean)"], loc_rows),
        doc.Table(["threshold (tuned on validation)", "value"], tau_rows),
    ]  # fmt: skip
    ns = raws[0]["ns"]
    acc = lambda sel, n: ratio_stat(raws, lambda r: r["bon"][sel][n])  # noqa: E731
    bon_rows = []
    for sel in SELECTORS:
        row = [sel]
        for n in ns:
            numbers[f"bon/{sel}/{n}"] = boot(acc(sel, n))
            row.append(numbers[f"bon/{sel}/{n}"])
        bon_rows.append(row)
    sections[SECTION["bon"]].items.append(doc.Table(["selector", *(f"N = {n}" for n in ns)], bon_rows))
    rm_bases = [f"{k}:{how}" for k in RMS for how in RM_AGGREGATES if f"{k}:{how}" in raws[0]["bon"]]
    for m in MODELS:
        for base in (f"{m}:sum", "majority vote", "reference likelihood", *rm_bases):  # RMs: reported
            for n in ns:
                d = auroc_diff_stat(acc(f"{m}:min", n), acc(base, n))
                numbers[f"diff/{m}/{base}/{n}"] = boot(d, (-1.0, 1.0))
                diff_rows.append([f"best-of-N: {m}:min − {base}", n, numbers[f"diff/{m}/{base}/{n}"]])
    sections[SECTION["diff"]].items.append(doc.Table(["comparison", "N", "difference"], diff_rows))
    return numbers


def auroc_diff_stat(a, b):
    """A paired difference of two statistics under the same weights."""
    return lambda s, W: a(s, W) - b(s, W)


def claim_verdicts(n: dict[str, seeds_lib.Interval], ns: Sequence[int]) -> dict[str, doc.Verdict]:
    """The rules of docs/experiments.md ("Process rewards"), from the intervals (the wider of the
    bootstrap and the seed-t; the text gives both)."""
    out = {}
    checks = []
    for m in MODELS:
        auc, diff = n[f"auroc/{m}"], n[f"auroc_diff/{m}"]
        checks.append(
            (
                auc.above(0.5),
                f"{MODELS[m]}: step AUROC {auc.detail()} {'above' if auc.above(0.5) else 'not surely above'} "
                "0.5",
            )
        )
        checks.append(
            (
                diff.above(0.0),
                f"minus the reference's {diff.detail()} "
                f"{'above' if diff.above(0.0) else 'not surely above'} 0",
            )
        )
        pos = n[f"auroc_diff_pos/{m}"]  # rule of 2026-12-07: the position baseline must be beaten too
        word = "above" if pos.above(0.0) else "not surely above"
        checks.append((pos.above(0.0), f"minus the position's {pos.detail()} {word} 0"))
    status, why = doc.grade(checks)
    if not any(ok for ok, _ in checks[::3]):  # no AUROC surely above chance
        status = "does not hold"
    out[SECTION["loc"]] = doc.Verdict(CLAIM_LOC, status, why)
    checks = []
    for m in MODELS:
        for base in (f"{m}:sum", "majority vote", "reference likelihood"):
            for k in (x for x in ns if x >= 16):
                d = n[f"diff/{m}/{base}/{k}"]
                checks.append((d.above(0.0), f"{m}:min − {base} at N = {k}: {d.detail()}"))
    if not checks:
        out[SECTION["diff"]] = doc.Verdict(CLAIM_BON, "does not hold", "no N ≥ 16 was measured.")
    else:
        status, why = doc.grade(checks)
        out[SECTION["diff"]] = doc.Verdict(CLAIM_BON, status, why)
    return out


def main_with(args: argparse.Namespace, scale: dict) -> int:
    """Every seed (harness.run_seeds: per-seed reports cached), then the tables and verdicts from the
    per-item results of all seeds."""
    report = harness.run_seeds(run, lambda numbers, scale: {}, args, scale)
    raws = [pickle.loads((Path(args.workdir) / f"seed{s}" / RAW_FILE).read_bytes()) for s in args.seeds]
    numbers = build_tables(report, raws, scale.get("n_boot", 1000))
    report.intro = report.intro.replace(seeds_lib.INTERVAL_KIND, seeds_lib.WIDER_KIND)
    report.intro += (
        f"\n\nTable intervals: {seeds_lib.WIDER_KIND}, over seeds {', '.join(map(str, args.seeds))} "
        f"and {raws[0]['n_prompts']} held-out prompts each; setup counts: t-intervals over seeds."
    )
    sections = {s.title: s for s in report.sections}
    found, report.inputs = seeds_lib.judge(lambda n: claim_verdicts(n, raws[0]["ns"]), numbers)
    for title, v in found.items():
        sections[title].verdict = v
    report.verdict = next(iter(found.values()))
    report.numbers = numbers
    return harness.write_report(NAME, report, args.results)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sweep", action="store_true",
                        help="also train each PRM at every (lr, steps) of the scale's sweep and report them "
                        "on "
                        "validation prompts")  # fmt: skip
    for m in MODELS:
        parser.add_argument(
            f"--{m}-lr", type=float, default=None, help=f"{MODELS[m]} learning rate (None: the scale's)"
        )
        parser.add_argument(
            f"--{m}-steps", type=int, default=None, help=f"{MODELS[m]} steps (None: the scale's)"
        )


# ------------------------------------------------------------------------------------------ scales

# sft_steps: the reference; n_train_prompts × n_train_cands: reference samples labelled by their final
# answer (DPO: up to pairs_per_prompt pairs a prompt; CE: every candidate); dpo / ce: lr and steps of the
# two PRMs (the sweep's choice, docs/experiments.md); n_val_*: thresholds (and the sweep); n_test_*:
# held-out prompts × candidates; ns: best-of-N sizes, bon_repeats draws of N per prompt; n_boot: bootstrap.
SCALES = {
    "full": dict(
        sft_steps=6000,
        n_train_prompts=4160,  # the 520 training problems, 8 times each
        n_train_cands=16,
        pairs_per_prompt=4,
        beta=0.1,
        dpo=dict(lr=3e-4, steps=2000),
        ce=dict(lr=3e-4, steps=2000),
        sweep=((1e-4, 2000), (3e-4, 700), (3e-4, 2000), (1e-3, 700), (1e-3, 2000)),
        n_val_prompts=80,  # every validation problem
        n_val_cands=16,
        n_test_prompts=200,  # every test problem
        n_test_cands=64,
        ns=(1, 4, 16, 64),
        bon_repeats=16,
        n_boot=1000,
    ),
    "quick": dict(
        sft_steps=600,
        n_train_prompts=520,
        n_train_cands=8,
        pairs_per_prompt=2,
        beta=0.1,
        dpo=dict(lr=3e-4, steps=200),
        ce=dict(lr=3e-4, steps=200),
        sweep=((3e-4, 100), (1e-3, 200)),
        n_val_prompts=40,
        n_val_cands=8,
        n_test_prompts=64,
        n_test_cands=64,
        ns=(1, 4, 16, 64),
        bon_repeats=4,
        n_boot=300,
    ),
}


def main(argv: Sequence[str] | None = None, scales=None, results_dir=harness.RESULTS_DIR) -> int:
    argv, scales = harness.with_defaults(sys.modules[__name__], argv, scales)
    args = harness.parse_args(sys.modules[__name__], argv, results_dir)
    return main_with(args, scales["quick" if args.quick else "full"])


if __name__ == "__main__":
    sys.exit(main())
