"""Tests of the experiment machinery in the package: statistics, the §5.4 check, tables, report files
and verdicts, config resolution, and the thin experiments/ scripts' arguments."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax import tokenq
from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis import metrics
from dpoq_jax.analysis.credit import response_logits
from dpoq_jax.data.synthetic import dense_optimal_values, dense_shaping
from dpoq_jax.train import runs


def kl_ref_policy_np(policy_logits_BTV: np.ndarray, ref_logits_BTV: np.ndarray) -> np.ndarray:
    """KL(π_ref(·|s_t) ‖ π(·|s_t)) per state in float64 numpy -> [B, T] (independent reference)."""

    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lr = log_softmax(policy_logits_BTV), log_softmax(ref_logits_BTV)
    return np.sum(np.exp(lr) * (lr - lp), axis=-1)


def _wilson_brute(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson interval is the set of p with |k/n - p| <= z sqrt(p(1-p)/n): find it on a fine grid."""
    p = np.linspace(0.0, 1.0, 2_000_001)
    inside = np.abs(k / n - p) <= z * np.sqrt(p * (1 - p) / n)
    return float(p[inside].min()), float(p[inside].max())


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (128, 256), (200, 256)])
def test_wilson_matches_its_definition(k: int, n: int) -> None:
    lo, hi = metrics.wilson_interval(k, n)
    blo, bhi = _wilson_brute(k, n, 1.959963984540054)
    assert lo == pytest.approx(blo, abs=2e-6) and hi == pytest.approx(bhi, abs=2e-6)
    assert lo <= k / n <= hi


def test_wilson_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n must be > 0"):
        metrics.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        metrics.wilson_interval(11, 10)


def test_spearman_and_pearson() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert metrics.spearman(x, x**3) == pytest.approx(1.0)
    assert metrics.pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    d = np.array([1, -1, 1, -1, 0])  # rank differences
    assert metrics.spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (5 * 24))


def test_section54_identity_exact_and_monte_carlo() -> None:
    """E_{a~π_ref}[β log π/π_ref] = −β KL(π_ref‖π): tokenq vs float64 numpy, and sampling from π_ref."""
    beta = 0.3
    kp, kr, ks = jax.random.split(jax.random.PRNGKey(0), 3)
    B, T, V = 2, 3, 7
    pol_BTV = 1.5 * jax.random.normal(kp, (B, T, V))
    ref_BTV = 1.5 * jax.random.normal(kr, (B, T, V))
    exact_BT = np.asarray(tokenq.expected_ref_reward(pol_BTV, ref_BTV, beta))
    ref_np = -beta * kl_ref_policy_np(np.asarray(pol_BTV), np.asarray(ref_BTV))
    np.testing.assert_allclose(exact_BT, ref_np, rtol=1e-5, atol=1e-6)
    assert (exact_BT <= 1e-7).all()
    assert tokenq.expected_ref_reward(ref_BTV, ref_BTV, beta) == pytest.approx(0.0, abs=1e-6)

    # Monte-Carlo: many samples a ~ π_ref at every state, β log π/π_ref of what was sampled.
    S = 20_000
    a_SBT = jax.random.categorical(ks, ref_BTV, axis=-1, shape=(S, B, T))
    lp = jax.nn.log_softmax(pol_BTV, -1)
    lr = jax.nn.log_softmax(ref_BTV, -1)

    def take(l_BTV):
        return jnp.take_along_axis(jnp.broadcast_to(l_BTV, (S, B, T, V)), a_SBT[..., None], -1)[..., 0]

    r_SBT = np.asarray(beta * (take(lp) - take(lr)))
    mask = np.ones((S * B, T))
    exact_rep = np.broadcast_to(exact_BT, (S, B, T)).reshape(S * B, T)
    summary = metrics.section54_summary(exact_rep, r_SBT.reshape(S * B, T), mask)
    assert summary["tokens"] == S * B * T
    assert abs(summary["diff_mean"]) < 4 * summary["diff_se"]
    assert summary["exact_max"] <= 0
    assert summary["mc_mean"] == pytest.approx(summary["exact_mean"], abs=4 * summary["mc_se"])


def test_section54_summary_masks_padding() -> None:
    exact = np.array([[-1.0, -2.0, 99.0]])
    mc = np.array([[-1.5, -1.5, 99.0]])
    s = metrics.section54_summary(exact, mc, np.array([[1, 1, 0]]))
    assert s["tokens"] == 2 and s["exact_mean"] == -1.5 and s["mc_mean"] == -1.5
    assert s["per_response_exact"] == -3.0
    with pytest.raises(ValueError, match="no real tokens"):
        metrics.section54_summary(exact, mc, np.zeros((1, 3)))


def test_table_and_report_files(tmp_path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = doc.Table(["beams", "win rate"], [[1, 0.5], [5, 0.612345]], caption="c|d")
    md = t.markdown()
    assert md.splitlines()[0] == "| beams | win rate |" and "| 5 | 0.612 |" in md
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        doc.Table(["a", "b"], [[1]])
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    png = doc.fig_to_png(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    rep = doc.Report("T <x>", intro="some `code`", meta={"seed": "0"})
    rep.add("S", "- a\n- b", t, doc.Figure("curve", png, "a curve"))
    paths = rep.write(tmp_path / "r.md", tmp_path / "r.html")
    assert (tmp_path / "r_figures" / "curve.png").read_bytes() == png
    text = (tmp_path / "r.md").read_text()
    assert "![a curve](r_figures/curve.png)" in text and "| seed | 0 |" in text
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "T &lt;x&gt;" in page and "<li>a</li>" in page
    assert page.count("<table>") == 1 and len(paths) == 3
    assert not math.isnan(float(doc.fmt(0.5)))


def test_dense_optimal_values_match_enumeration() -> None:
    """V*(s_0) = β log E_{y~π_ref}[exp(R(y)/β)] over every response of a short-horizon task, and the
    optimal implicit rewards r + ΔV sum to R(y) − V*(s_0) (telescoping)."""
    from dpoq_jax.data import synthetic as syn

    task = syn.DenseRewardTask(seed=3, min_len=1, eos_prob=0.4, max_len=3, gold_len_limit=2)
    beta = 0.7
    V = dense_optimal_values(task, beta)
    prompt = "<bos>cb="
    letters = range(syn.LETTER0, syn.LETTER0 + syn.N_LETTERS)
    total, seqs = 0.0, []
    for length in range(1, task.max_len + 1):
        for ys in itertools.product(letters, repeat=length):
            seqs.append(list(ys) + [syn.EOS_ID])
    for y in seqs:
        prev, p = task._prev_letter(prompt), 1.0
        for t, tok in enumerate(y):
            p *= task.reference_next_probs(prev, t)[tok]
            prev = tok - syn.LETTER0 if tok != syn.EOS_ID else prev
        total += p * math.exp(task.gold_score(prompt, y) / beta)
    v0 = V[task._prev_letter(prompt), 0]
    assert v0 == pytest.approx(beta * math.log(total), rel=1e-10)
    y = seqs[123]
    shaping = dense_shaping(task, prompt, y, V)
    implicit = task.gold_token_rewards(prompt, y) + shaping
    assert implicit.sum() == pytest.approx(task.gold_score(prompt, y) - v0, rel=1e-10)
    with pytest.raises(ValueError, match="not a letter"):
        dense_shaping(task, prompt, [syn.DIGIT0, syn.EOS_ID], V)


def test_blame_profile() -> None:
    from dpoq_jax.experiments.credit_assignment import blame_profile

    rewards = [np.array([0.0, -1.0, -3.0, -0.5]), np.array([-2.0, 0.0, 0.0])]
    errors = [[1], [0, 2]]
    b = blame_profile(rewards, errors)
    assert b["argmin +1"] == 0.5 and b["argmin on error"] == 0.5
    assert b["r before first error"] == 0.0  # only response 0 has tokens before its first error
    assert b["r on errors"] == pytest.approx((-1.0 - 2.0 + 0.0) / 3)
    assert b["r after first error"] == pytest.approx((-3.0 - 0.5 + 0.0) / 3)


def _tiny_decoder(seed: int):
    from flax import nnx

    from dpoq_jax.models.config import ModelConfig
    from dpoq_jax.models.decoder import Decoder
    from dpoq_jax.train.config import TINY_LLAMA

    cfg = ModelConfig.from_dict(dict(TINY_LLAMA, hidden_size=32, num_layers=1, intermediate_size=64))
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_section54_on_tiny_models_and_logit_alignment() -> None:
    """The glue that feeds §5.4: response_logits picks the states that predict each response token
    (same log-probs as analysis.credit.score_responses), and the exact per-state expectation from
    tokenq equals −β KL computed in float64 numpy from those logits."""
    from dpoq_jax.analysis.credit import score_responses

    policy, ref = _tiny_decoder(0), _tiny_decoder(1)
    prompts = [[1, 5, 6, 7], [1, 9], [1, 3, 4, 5, 6, 8]]
    responses = [[10, 11, 2], [12, 2], [13, 14, 15, 16, 2]]
    beta = 0.5
    pol = response_logits(policy, prompts, responses, max_floats=200)  # forces several batches
    rl = response_logits(ref, prompts, responses)
    scored = score_responses(policy, ref, prompts, responses, beta)
    for p_RV, r_RV, resp, sc in zip(pol, rl, responses, scored, strict=True):
        assert p_RV.shape == (len(resp), 42)
        lp = np.asarray(tokenq.token_logps(p_RV[None], np.asarray(resp)[None]))[0]
        np.testing.assert_allclose(lp, sc.logps, rtol=1e-5, atol=1e-5)
        exact = np.asarray(tokenq.expected_ref_reward(p_RV[None], r_RV[None], beta))[0]
        np.testing.assert_allclose(exact, -beta * kl_ref_policy_np(p_RV, r_RV), rtol=1e-5, atol=1e-6)
        assert (exact < 0).all()


def test_stage_config_and_diff_keys(tmp_path) -> None:
    # The packaged default and the repository's re-exports resolve to the same config values.
    packaged = runs.stage_config(runs.default_config("error_injection"), "sft")
    assert packaged.endswith("dpoq_jax/configs/error_injection_sft.py")
    clone = runs.stage_config("experiments/configs/error_injection", "sft")  # repo-relative fixture
    assert clone == "experiments/configs/error_injection_sft.py"
    assert runs.peek_config(clone, "sft").to_dict() == runs.peek_config(packaged, "sft").to_dict()
    assert runs.stage_config("experiments/configs/error_injection:x", "dpo").endswith(
        "error_injection_dpo.py:x"
    )
    one = tmp_path / "one.py"
    one.write_text("def get_config(arg=None): ...\n")
    assert runs.stage_config(str(one), "dpo") == f"{one}:dpo"
    with pytest.raises(FileNotFoundError, match="no nowhere_sft.py"):
        runs.stage_config("nowhere", "sft")
    assert runs._diff_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_experiment_args(tmp_path) -> None:
    from dpoq_jax.experiments import credit_assignment, implicit_rewards, search_overopt

    a = search_overopt.parse_args(["--seed", "1", "--config.train.lr=0.1"], tmp_path)
    assert a.workdir == "runs/experiments/dense_reward" and a.seed == 1
    assert a.overrides[-1] == "--config.train.lr=0.1"
    assert "--config.data.on_error=skip" in a.overrides  # dense_reward's own settings come first
    assert a.command == "python -m experiments.search_overopt --seed 1 --config.train.lr=0.1"
    assert a.results == str(tmp_path / "search_overopt.md")
    a = credit_assignment.parse_args(["--heatmap-pairs", "2"], tmp_path)
    assert (a.heatmap_pairs, a.overrides, a.workdir) == (2, [], "runs/experiments/error_injection")
    a = implicit_rewards.parse_args(["--task", "dense_reward"], tmp_path)
    assert a.workdir == "runs/experiments/dense_reward"
    assert a.config == runs.default_config("dense_reward")
    assert a.results == str(tmp_path / "implicit_rewards_dense_reward.md")
    with pytest.raises(SystemExit):
        search_overopt.parse_args(["--stray"], tmp_path)


def test_thin_scripts_write_into_experiments_results() -> None:
    """`python -m experiments.<name>` is the package's experiment with the script's results folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "experiments.dense_recovery", "--help"],
        cwd=root,
        env={**os.environ, "COLUMNS": "1000"},  # argparse would wrap the path at its hyphens
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "python -m experiments.dense_recovery" in out
    assert str(root / "experiments" / "results" / "dense_recovery.md") in out


def test_report_numbers_sections_and_places_verdicts(tmp_path) -> None:
    rep = doc.Report("R")
    part = rep.add("Part A", "intro A")
    part.verdict = doc.Verdict("claim A", "partly", "x is 1")
    rep.add("Sub one", "t", level=2)
    sub = rep.add("Sub two", "t", level=2)
    sub.verdict = doc.Verdict("claim B", "holds", "y is 2")
    rep.add("Part B")
    md = rep.markdown("figs")
    heads = [line for line in md.splitlines() if line.startswith("#")]
    assert heads == ["# R", "## 1. Part A", "### 1.1. Sub one", "### 1.2. Sub two", "## 2. Part B"]
    # A sub-section's verdict ends it; a part's verdict ends the part, after its sub-sections.
    assert md.index("**Verdict: holds.** y is 2") < md.index("**Verdict: partly.** x is 1")
    assert md.index("**Verdict: partly.** x is 1") < md.index("## 2. Part B")
    page = rep.html()
    assert "<h3 id='s1.2'>1.2. Sub two</h3>" in page and "class='verdict partly'" in page
    with pytest.raises(ValueError, match="status"):
        doc.Verdict("c", "maybe", "")
    assert doc.grade([(True, "a"), (True, "b")]) == ("holds", "a; b.")
    assert doc.grade([(True, "a"), (False, "b")])[0] == "partly"
    assert doc.grade([(False, "a")])[0] == "does not hold"


def test_text_colour_follows_luminance() -> None:
    import matplotlib

    cmap = matplotlib.colormaps["RdBu"]
    assert doc.text_colour(cmap(0.0)) == "white" and doc.text_colour(cmap(1.0)) == "white"  # dark ends
    assert doc.text_colour(cmap(0.5)) == "black"  # near-white middle
    assert doc.text_colour((1.0, 1.0, 0.0)) == "black" and doc.text_colour((0.0, 0.0, 0.5)) == "white"


def test_verdicts_are_computed_from_the_numbers() -> None:
    from dpoq_jax.experiments import credit_assignment, implicit_rewards, search_overopt

    # Credit assignment: above chance and better than the reference alone / only above chance / neither.
    v = credit_assignment.verdict(["dpo", 0.9, 0.95, 0.9], ["ref", 0.5, 0.8, 0.8], n=256, chance=0.1)
    assert v.status == "holds" and "90.0%" in v.why
    v = credit_assignment.verdict(["dpo", 0.43, 0.75, 0.7], ["ref", 0.918, 0.95, 0.9], n=256, chance=0.1)
    assert v.status == "partly" and "reference alone scores 91.8%" in v.why
    assert credit_assignment.verdict(["d", 0.1, 0.5, 0.5], ["r", 0.9, 0.9, 0.9], 256, 0.1).status == (
        "does not hold"
    )

    # Beam search: more beams help then hurt, but responses get shorter -> partly, and it says shorter.
    def per(wr, length):
        return {"win_rate": wr, "length": length}

    res = {0.1: {"beam 1": per(0.5, 20.0), "beam 2": per(0.6, 15.0), "beam 5": per(0.4, 12.0)}}
    v = search_overopt.verdict(res, (1, 2, 5))
    assert v.status == "partly" and "length change -8.0" in v.why
    res = {0.1: {"beam 1": per(0.5, 10.0), "beam 2": per(0.6, 15.0), "beam 5": per(0.4, 20.0)}}
    assert search_overopt.verdict(res, (1, 2, 5)).status == "holds"
    assert search_overopt.verdict({0.1: {k: res[0.1][k] for k in ("beam 1", "beam 2")}}, (1, 2)).status == (
        "partly"  # over-optimisation not measured with two widths: never "holds"
    )

    # Implicit rewards: (a)'s chosen reward falls, its margin grows, more than (b)'s; identity within 2 s.e.
    def curve(c0, c1, m0, m1):
        return [{"rewards/chosen": c0, "rewards/margins": m0}, {"rewards/chosen": c1, "rewards/margins": m1}]

    ok = {"mc_mean": -0.1, "exact_mean": -0.1, "diff_se": 0.01, "exact_max": -1e-4}
    curves = {"sft_ref": curve(0.0, -0.3, 0.0, 0.5), "no_sft_ref": curve(0.0, 0.1, 0.0, 0.4)}
    assert implicit_rewards.verdict(curves, {"a": ok, "b": ok}).status == "holds"
    bad = dict(ok, mc_mean=0.0)  # z = 10
    curves["sft_ref"] = curve(0.0, 0.2, 0.0, 0.5)
    v = implicit_rewards.verdict(curves, {"a": ok, "b": bad})
    assert v.status == "partly" and "does not fall" in v.why and "+10.00" in v.why
