"""Tests of the experiment machinery in the package: statistics, the §5 check, tables, report files
and verdicts, config resolution, and the experiments' command lines."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax import tokenq
from dpoq_jax.analysis import document as doc
from dpoq_jax.analysis import stats
from dpoq_jax.analysis.credit import response_logits
from dpoq_jax.data.synthetic import dense_optimal_values, dense_shaping, make_task
from dpoq_jax.experiments import runs

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"  # any cwd


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
    lo, hi = stats.wilson_interval(k, n)
    blo, bhi = _wilson_brute(k, n, 1.959963984540054)
    assert lo == pytest.approx(blo, abs=2e-6) and hi == pytest.approx(bhi, abs=2e-6)
    assert lo <= k / n <= hi


def test_wilson_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="n must be > 0"):
        stats.wilson_interval(0, 0)
    with pytest.raises(ValueError, match="successes"):
        stats.wilson_interval(11, 10)


def test_spearman_and_pearson() -> None:
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats.spearman(x, x**3) == pytest.approx(1.0)
    assert stats.pearson(x, -2 * x + 1) == pytest.approx(-1.0)
    y = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    d = np.array([1, -1, 1, -1, 0])  # rank differences
    assert stats.spearman(x, y) == pytest.approx(1 - 6 * (d**2).sum() / (5 * 24))


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
    summary = stats.section54_summary(exact_rep, r_SBT.reshape(S * B, T), mask)
    assert summary["tokens"] == S * B * T
    assert abs(summary["diff_mean"]) < 4 * summary["diff_se"]
    assert summary["exact_max"] <= 0
    assert summary["mc_mean"] == pytest.approx(summary["exact_mean"], abs=4 * summary["mc_se"])


def test_section54_summary_masks_padding() -> None:
    exact = np.array([[-1.0, -2.0, 99.0]])
    mc = np.array([[-1.5, -1.5, 99.0]])
    s = stats.section54_summary(exact, mc, np.array([[1, 1, 0]]))
    assert s["tokens"] == 2 and s["exact_mean"] == -1.5 and s["mc_mean"] == -1.5
    assert s["per_response_exact"] == -3.0
    with pytest.raises(ValueError, match="no real tokens"):
        stats.section54_summary(exact, mc, np.zeros((1, 3)))


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

    from dpoq_jax.configs.synthetic import TINY_LLAMA
    from dpoq_jax.models.decoder import Decoder
    from dpoq_jax.models.model_config import ModelConfig

    cfg = ModelConfig.from_dict(dict(TINY_LLAMA, hidden_size=32, num_layers=1, intermediate_size=64))
    return Decoder(cfg, rngs=nnx.Rngs(seed))


def test_section54_on_tiny_models_and_logit_alignment() -> None:
    """The glue that feeds §5: response_logits picks the states that predict each response token
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
    # The packaged default is the synthetic config file with the task as its argument, the stage after it.
    from dpoq_jax.configs.synthetic import synthetic_config

    packaged = runs.stage_config(runs.default_config("error_injection"), "sft")
    assert packaged.endswith("dpoq_jax/configs/synthetic.py:error_injection:sft")
    peeked = runs.peek_config(runs.default_config("error_injection"), "sft")
    assert peeked.to_dict() == synthetic_config("error_injection", "sft").to_dict()
    prefix = tmp_path / "mine"
    (tmp_path / "mine_dpo.py").write_text("def get_config(arg=None): ...\n")
    assert runs.stage_config(f"{prefix}:x", "dpo") == f"{prefix}_dpo.py:x"  # PREFIX_<stage>.py[:arg]
    one = tmp_path / "one.py"
    one.write_text("def get_config(arg=None): ...\n")
    assert runs.stage_config(str(one), "dpo") == f"{one}:dpo"
    with pytest.raises(FileNotFoundError, match="no nowhere_sft.py"):
        runs.stage_config("nowhere", "sft")
    assert runs._diff_keys({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0}) == ["a.c", "d"]


def test_experiment_args(tmp_path) -> None:
    from dpoq_jax.experiments import credit_assignment, harness, implicit_rewards, search_overopt

    a = harness.parse_args(search_overopt, ["--seeds", "1,3", "--config.train.lr=0.1"], tmp_path)
    assert a.workdir == "runs/experiments/dense_reward" and a.seeds == (1, 3)
    assert a.overrides == ["--config.train.lr=0.1"]  # the user's; the task's own settings are in its config
    cfg = runs.peek_config(a.config, "dpo")
    assert cfg.data.on_error == "skip" and cfg.data.response_len == make_task("dense_reward").max_len + 2
    assert a.command == "python -m dpoq_jax.experiments.search_overopt --seeds 1,3 --config.train.lr=0.1"
    assert a.results == str(tmp_path / "search_overopt.md")
    a = harness.parse_args(credit_assignment, ["--heatmap-pairs", "2"], tmp_path)
    assert (a.heatmap_pairs, a.overrides, a.workdir) == (2, [], "runs/experiments/error_injection")
    quick = harness.parse_args(credit_assignment, ["--quick"], tmp_path)
    assert a.seeds == (0, 1, 2, 3, 4) and quick.seeds == (
        0,
        1,
    )
    assert harness.parse_args(credit_assignment, ["--seeds", "0-2"], tmp_path).seeds == (0, 1, 2)
    a = harness.parse_args(implicit_rewards, ["--task", "dense_reward"], tmp_path)
    assert a.workdir == "runs/experiments/dense_reward"
    assert a.config == runs.default_config("dense_reward")
    assert a.results == str(tmp_path / "implicit_rewards_dense_reward.md")
    for bad in (["--stray"], ["--seeds", "1,1"], ["--seeds", "x"]):
        with pytest.raises(SystemExit) as e:
            harness.parse_args(search_overopt, bad, tmp_path)
        assert e.value.code == 2, (bad, e.value.code)  # argparse's usage error, not a clean exit


def test_reports_name_configs_without_machine_paths(tmp_path, monkeypatch) -> None:
    """The "config" row of a report: a packaged config as its package resource, one under the working
    directory relative to it, any other as given; the committed reports hold no absolute path."""
    from dpoq_jax.experiments import credit_assignment, harness

    a = harness.parse_args(credit_assignment, ["--seeds", "0"], tmp_path)
    a.seed = 0
    assert harness.run_meta(a)["config"] == "dpoq_jax/configs/synthetic.py:error_injection"
    monkeypatch.chdir(tmp_path)
    assert harness.config_label(f"{tmp_path}/mine/task:x") == "mine/task:x"
    assert harness.config_label("/elsewhere/task_dpo.py") == "/elsewhere/task_dpo.py"
    rows = [
        (md.name, line)
        for md in sorted((CONFIGS.parent / "results").glob("*.md"))
        for line in md.read_text().splitlines()
        if line.startswith("| config |")
    ]
    assert rows and all(not line.split("|")[2].strip().startswith("/") for _, line in rows), rows


def test_experiment_modules_run_as_scripts_into_experiments_results() -> None:
    """`python -m dpoq_jax.experiments.<name>` holds its scales and writes into experiments/results."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-m", "dpoq_jax.experiments.dense_recovery", "--help"],
        cwd=root,
        env={**os.environ, "COLUMNS": "1000"},  # argparse would wrap the path at its hyphens
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "python -m dpoq_jax.experiments.dense_recovery" in out
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


def iv(mean: float, half: float = 0.0):
    """A 5-seed interval mean ± half."""
    from dpoq_jax.analysis import seeds

    return seeds.Interval(mean, mean - half, mean + half, 5)


def test_verdicts_are_computed_from_the_intervals() -> None:
    from dpoq_jax.experiments import credit_assignment, dense_recovery, implicit_rewards, search_overopt

    # Credit assignment, per setting at β = 0.1 (rules of 2026-12-07): paired differences DPO − reference
    # alone and DPO − position, for AUROC and top-1; all four above 0 holds, one metric's pair partly;
    # the fluent setting's premise (reference AUROC ≈ 0.5) caps it at partly; chance alone earns nothing.
    scale = {"settings": {"fluent": (0.1,), "surprising": (0.1,)}}

    def credit(auroc_ref, auroc_pos, top1_ref, top1_pos, ref_auroc=0.52, half=0.02, diff_half=0.03,
               gold=0.05):  # fmt: skip
        n = {}
        for s in ("fluent", "surprising"):
            n |= {
                f"{s}/beta0.1/dpo_top1": iv(0.6, half),
                f"{s}/beta0.1/dpo_auroc": iv(ref_auroc + auroc_ref, half),
                f"{s}/beta0.1/dpo_minus_ref_auroc": iv(auroc_ref, diff_half),  # paired
                f"{s}/beta0.1/dpo_minus_pos_auroc": iv(auroc_pos, diff_half),
                f"{s}/beta0.1/dpo_minus_ref_top1": iv(top1_ref, diff_half),
                f"{s}/beta0.1/dpo_minus_pos_top1": iv(top1_pos, diff_half),
                f"{s}/ref_top1": iv(0.3),
                f"{s}/ref_auroc": iv(ref_auroc, half),
                f"{s}/pos_top1": iv(0.4),
                f"{s}/pos_auroc": iv(0.7),
                f"{s}/chance": iv(0.25),
                f"{s}/beta0.1/greedy_gold_diff": iv(gold, 0.02),
                f"{s}/ref_greedy_gold": iv(0.4, 0.05),
            }
        return credit_assignment.verdicts(n, scale)

    fluent, surprising = (title for title, _ in credit_assignment.SETTINGS.values())
    answers = credit_assignment.answers_title("fluent")
    v = credit(0.2, 0.1, 0.3, 0.2)
    assert v[fluent].status == "holds" and "premise met" in v[fluent].why
    assert "the position: AUROC 0.700" in v[fluent].why and "DPO − position: AUROC 0.100" in v[fluent].why
    assert list(v)[:2] == [fluent, surprising]  # the fluent setting's verdict is the report's own
    assert v[answers].status == "holds" and "0.050 [0.030, 0.070]" in v[answers].why
    assert credit(0.2, 0.1, 0.3, 0.2, gold=-0.05)[answers].status == "does not hold"
    assert "(worse)" in credit(0.2, 0.1, 0.3, 0.2, gold=-0.05)[answers].why
    assert "not surely above 0" in credit(0.2, 0.1, 0.3, 0.2, gold=0.01)[answers].why
    v = credit(0.2, 0.1, 0.3, 0.01)[surprising]  # top-1 not surely above the position's
    assert v.status == "partly" and "above both baselines on AUROC only" in v.why
    assert credit(0.2, 0.01, 0.3, 0.01)[surprising].status == "does not hold"  # the position is as good
    assert credit(-0.1, 0.1, 0.3, 0.2)[surprising].status == "partly"  # the reference alone has better AUROC
    # Arms whose intervals overlap but paired differences surely above 0: the paired ones decide.
    assert credit(0.02, 0.02, 0.02, 0.02, half=0.05, diff_half=0.01)[surprising].status == "holds"
    assert credit(0.1, 0.1, 0.1, 0.1, half=0.01, diff_half=0.2)[surprising].status == "does not hold"
    assert credit_assignment.verdicts({"sweep/choice": iv(0.0)}, scale) == {}  # a sweep alone
    assert credit(0.2, 0.1, 0.3, 0.2, ref_auroc=0.7)[fluent].status == "partly"  # premise not met

    # Search, per labeller and β: 5 beams beat 1, the widest is worse than 5 and longer than 1.
    sc = {"betas": (0.1,), "beams": (1, 2, 5, 20), "alphas": (0.0, 1.0)}

    def search(unbiased, biased, at_zero=(0.0, 0.0, 0.0)):
        n = {}
        for s, (gain, drop, longer) in (("unbiased", unbiased), ("biased", biased)):
            n |= {
                f"{s}/beta0.1/alpha1/gain_few": iv(gain, 0.05),
                f"{s}/beta0.1/alpha1/drop_wide": iv(drop, 0.05),
                f"{s}/beta0.1/alpha1/longer_wide": iv(longer, 0.5),
            }
            names = ("gain_few", "drop_wide", "longer_wide")
            n |= {f"{s}/beta0.1/alpha0/{k}": iv(x, 0.05) for k, x in zip(names, at_zero, strict=True)}
        return search_overopt.verdicts(n, sc)

    v = search((0.0, 0.0, 0.0), (0.1, 0.3, 4.0))
    assert (
        list(v)[0] == "With and without the length bias"
        and v["With and without the length bias"].status == "holds"
    )
    assert [x.status for x in v.values()][1:] == ["does not hold", "holds"]
    assert "5 beams − 1 beam win rate 0.100 [0.050, 0.150]" in v[search_overopt.SETTINGS["biased"][0]].why
    assert "β=0.1, α=1: 5 beams" in v[search_overopt.SETTINGS["biased"][0]].why
    v = search((0.1, 0.3, 4.0), (0.1, 0.3, 4.0))  # the same with and without: the bias explains nothing
    assert v["With and without the length bias"].status == "does not hold"
    # the verdicts read α = 1: the pattern at α = 0 alone does not count
    v = search((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), at_zero=(0.1, 0.3, 4.0))
    assert [x.status for x in v.values()] == ["does not hold"] * 3

    # Implicit rewards: (a)'s chosen reward falls, its margin grows, more than (b)'s; identity within 2 s.e.
    n = {
        "sft_ref/chosen_change": iv(-0.3, 0.1),
        "sft_ref/margin_change": iv(0.5, 0.1),
        "a_minus_b_chosen_change": iv(-0.4, 0.1),
        "sft_ref/z": iv(0.5, 1.0),
        "no_sft_ref/z": iv(-0.3, 1.0),
        "max_exact": iv(-1e-4, 1e-5),
    }
    (v,) = implicit_rewards.verdicts(n, {}).values()
    assert v.status == "holds"
    v = implicit_rewards.verdicts(n | {"sft_ref/chosen_change": iv(-0.05, 0.1), "no_sft_ref/z": iv(10.0)}, {})
    (v,) = v.values()
    assert v.status == "partly" and "not surely below 0" in v.why and "10.000" in v.why

    # Dense recovery: the whole interval of the correlation above 0.5 / above 0 / not.
    for cor, status in ((0.8, "holds"), (0.3, "partly"), (0.05, "does not hold")):
        n = {"beta0.1/pearson_vs_optimal_implicit": iv(cor, 0.1)}
        assert dense_recovery.verdicts(n, {"betas": (0.1,)})["Correlations"].status == status


def test_t_interval_and_merged_tables() -> None:
    from dpoq_jax.analysis import seeds

    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    it = seeds.t_interval(x)
    half = 2.776 * np.std(x, ddof=1) / np.sqrt(5)  # t_{0.975, df=4} = 2.776
    assert (
        (it.mean, it.n) == (3.0, 5) and it.lo == pytest.approx(3 - half) and it.hi == pytest.approx(3 + half)
    )
    assert str(it) == "3.000 [1.037, 4.963]" and it.above(1.0) and not it.above(1.04)
    assert seeds.t_interval([2.0, float("nan")]) == seeds.Interval(2.0, 2.0, 2.0, 1)  # NaN dropped
    import scipy.stats as scipy_stats
    for df, t in seeds.T975.items():
        assert t == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)

    t1 = doc.Table(["β", "name", "score"], [[0.1, "a", 1.0], [0.3, "b", 0.5]])
    t2 = doc.Table(["β", "name", "score"], [[0.1, "a", 3.0], [0.3, "b", 0.5]])
    m = seeds.merge_tables([t1, t2])
    assert m.markdown().splitlines()[2] == "| 0.100 | a | 2.000 [-10.706, 14.706] |"
    with pytest.raises(ValueError, match="column 'name' differs"):
        seeds.merge_tables([t1, doc.Table(["β", "name", "score"], [[0.1, "x", 1.0], [0.3, "b", 0.5]])])

    reps = []
    for k in (1.0, 3.0):
        r = doc.Report("T", "intro")
        r.add("S", "text", doc.Table(["x"], [[k]]))
        r.numbers = {"x": k}
        reps.append(r)
    merged = seeds.merge_reports(reps, (0, 1), lambda n: {"S": doc.Verdict("c", "holds", f"x {n['x']}")})
    assert merged.verdict.why == "x 2.000 [-10.706, 14.706]" and merged.sections[0].verdict is merged.verdict
    assert "95% Student-t interval over seeds" in merged.intro and merged.meta["seeds"] == "0, 1"


def test_items_statistics_bootstrap_inside_their_range_and_pair() -> None:
    """Items: the point value equals the plain statistic (AUROC against the rank-based Mann–Whitney of
    analysis.stats, ties included); merged over seeds an AUROC near 1 keeps its interval in [0, 1]
    where the t-interval would not; a paired difference gets its own interval; Items and plain numbers
    do not mix."""
    from dpoq_jax.analysis import seeds
    from dpoq_jax.analysis.stats import auroc

    rng = np.random.default_rng(0)
    scores = [rng.integers(0, 4, size=int(rng.integers(2, 7))).astype(float) for _ in range(30)]  # ties
    labels = [rng.random(len(x)) < 0.3 for x in scores]
    it = seeds.Items.auroc(scores, labels)
    assert float(it) == pytest.approx(auroc(np.concatenate(scores), np.concatenate(labels)), abs=1e-12)
    w = rng.integers(0, 3, size=30)  # item multiplicities = the items repeated
    rep = [i for i in range(30) for _ in range(w[i])]
    assert it.stat(w[None].astype(float))[0] == pytest.approx(
        auroc(np.concatenate([scores[i] for i in rep]), np.concatenate([labels[i] for i in rep])), abs=1e-12
    )
    from dpoq_jax.analysis.stats import pearson

    xs = [rng.normal(size=int(rng.integers(1, 5))) for _ in range(12)]
    ys = [x + rng.normal(size=x.size) for x in xs]
    pc = seeds.Items.pearson(xs, ys, [g % 6 for g in range(12)])  # groups g and g + 6 are one item
    assert pc.n == 6
    assert float(pc) == pytest.approx(pearson(np.concatenate(xs), np.concatenate(ys)), abs=1e-12)
    w6 = np.array([2.0, 0.0, 1.0, 1.0, 3.0, 1.0])
    rep = [g for g in range(12) for _ in range(int(w6[g % 6]))]
    assert pc.stat(w6[None])[0] == pytest.approx(
        pearson(np.concatenate([xs[g] for g in rep]), np.concatenate([ys[g] for g in rep])), abs=1e-12
    )
    m = seeds.Items.mean([1.0, float("nan"), 0.0, 1.0])
    assert float(m) == pytest.approx(2 / 3) and m.n == 4
    d = seeds.Items.mean([1.0, 1.0, 0.0, 1.0]) - seeds.Items.mean([0.0, 1.0, 0.0, 0.0])
    assert float(d) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same 4 items"):
        _ = m - seeds.Items.mean([1.0])

    # five seeds of a near-perfect detector, 40 responses each: bootstrap inside [0, 1], t-interval not
    per_seed, values = [], []
    for s in range(5):
        r = np.random.default_rng(s)
        n_bad = 0 if s else 6  # one seed with a few misses
        sc = [np.array([1.0, 0.0, 0.0]) if i >= n_bad else np.array([0.0, 1.0, 1.0]) for i in range(40)]
        lab = [np.array([True, False, False])] * 40
        per_seed.append(seeds.Items.auroc(sc, lab))
        values.append(float(per_seed[-1]))
        del r
    boot, t = seeds.merge_number(per_seed), seeds.t_interval(values)
    assert 0.0 <= boot.lo <= boot.mean <= boot.hi <= 1.0 and t.hi > 1.0
    assert boot.mean == pytest.approx(np.mean(values))
    with pytest.raises(ValueError, match="Items in some seeds"):
        seeds.merge_number([per_seed[0], 0.5])
    # a paired difference that is surely positive although the two arms' intervals overlap
    base = [rng.random(200) for _ in range(5)]
    a = [seeds.Items.mean(b + 0.02) for b in base]
    b = [seeds.Items.mean(x) for x in base]
    ia, ib = seeds.merge_number(a), seeds.merge_number(b)
    idiff = seeds.merge_number([x - y for x, y in zip(a, b, strict=True)])
    assert ia.lo < ib.hi and idiff.lo == pytest.approx(0.02) and idiff.above(0.0)

    # tables: Items cells merge by the bootstrap, one seed gives its item interval; the note says which
    reps = []
    for s in range(2):
        r = doc.Report("T", "intro")
        r.add("S", "", doc.Table(["acc"], [[seeds.Items.mean([1.0, 0.0, 1.0, 1.0, s])]]))
        r.numbers = {"acc": seeds.Items.mean([1.0, 0.0, 1.0, 1.0, s]), "curve": float(s)}
        reps.append(r)
    merged = seeds.merge_reports(reps, (0, 1), lambda n: {})
    cell = merged.sections[0].items[0].rows[0][0]
    assert isinstance(cell, seeds.Interval) and 0 <= cell.lo <= cell.hi <= 1
    assert cell.mean == pytest.approx(0.7)
    assert "two-level bootstrap" in merged.intro and "Student-t" in merged.intro
    one = seeds.merge_reports(reps[:1], (0,), lambda n: {})
    assert one.numbers["acc"].lo < one.numbers["acc"].mean < one.numbers["acc"].hi  # items resampled
    assert "item-level bootstrap" in one.intro


def test_credit_scores_per_response_agree_with_the_pooled_scorer() -> None:
    from dpoq_jax.analysis.stats import credit_assignment_score
    from dpoq_jax.experiments.credit_assignment import choose_regime, score_items

    rng = np.random.default_rng(1)
    values = [rng.normal(size=int(rng.integers(3, 9))) for _ in range(50)]
    errors = [
        sorted(rng.choice(len(v), size=int(rng.integers(1, 3)), replace=False).tolist()) for v in values
    ]
    errors[3] = []  # a response without an injected token is left out by both
    got = {k: float(v) for k, v in score_items(values, errors).items()}
    want = credit_assignment_score(values, errors)
    assert got["top1"] == pytest.approx(want["top1"], abs=1e-12)
    assert got["auroc"] == pytest.approx(want["auroc_pooled"], abs=1e-12)
    assert got["auroc_per_response"] == pytest.approx(want["auroc_mean_per_response"], abs=1e-12)
    # the β-sweep figure takes the table's Items cells
    from dpoq_jax.analysis.seeds import Items
    from dpoq_jax.experiments.credit_assignment import beta_figure

    cell = lambda v: Items.mean([v, v + 0.1])  # noqa: E731
    rows = [[b, cell(0.7), cell(0.3), cell(0.6)] for b in (0.1, 0.3)]
    fig = beta_figure(rows, {"ref": ["ref", cell(0.2), cell(0.5)]}, "x")
    assert fig.png[:4] == b"\x89PNG"
    # the sweep's rule: the largest mean difference; ties to fewer steps, then the smaller lr
    by = {(1e-3, 50): [0.1, 0.0], (1e-4, 100): [0.3, 0.2], (3e-4, 50): [-0.1, 0.3]}
    assert choose_regime(by) == (1e-4, 100)
    assert choose_regime({(1e-3, 100): [0.1], (1e-4, 200): [0.1], (3e-4, 100): [0.1]}) == (3e-4, 100)


def test_run_seeds_merges_and_reuses_finished_seeds(tmp_path) -> None:
    import argparse

    from dpoq_jax.experiments import harness

    calls = []

    def run(a, scale):
        calls.append(a.seed)
        assert a.workdir == str(tmp_path / f"seed{a.seed}")
        r = doc.Report("T")
        r.add("S", "", doc.Table(["x"], [[float(a.seed)]]))
        r.numbers = {"x": float(a.seed)}
        return r

    def verdicts(n, scale):
        return {"S": doc.Verdict("c", "holds" if n["x"].above(-10) else "partly", str(n["x"]))}

    args = argparse.Namespace(seeds=(0, 1), workdir=str(tmp_path), command="cmd --seeds 0,1", task="t")
    rep = harness.run_seeds(run, verdicts, args, {"k": 1})
    assert calls == [0, 1] and rep.verdict.why == "0.500 [-5.853, 6.853]" and rep.verdict.status == "holds"
    assert rep.meta["command"] == "cmd --seeds 0,1"
    import re

    from dpoq_jax.analysis.document import code_commit

    # the verdict rules' commit (this checkout's, as git reports it) and when the judging call started
    assert rep.meta["verdict rules (code commit)"] == code_commit() != "unknown"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", rep.meta["judged at"])
    harness.run_seeds(run, verdicts, argparse.Namespace(**{**vars(args), "seeds": (1, 2)}), {"k": 1})
    assert calls == [0, 1, 2]  # seed 1 reused
    harness.run_seeds(run, verdicts, args, {"k": 2})  # other settings: both seeds run again
    assert calls == [0, 1, 2, 0, 1]


def test_experiments_sharing_a_workdir_keep_their_finished_seeds_apart(tmp_path) -> None:
    """Two experiments run as `python -m` (module __main__) in one workdir: each keeps its own seed
    report (named by its NAME), so running one does not throw the other's away; a report under the
    name used before (the module's) is still read when its settings match."""
    import argparse
    import pickle
    import sys
    import types

    from dpoq_jax.experiments import harness

    calls = []

    def experiment(name: str):
        mod = types.ModuleType(f"fake_{name}")
        mod.NAME = name

        def run(a, scale):
            calls.append((name, a.seed))
            r = doc.Report(name)
            r.add("S", "", doc.Table(["x"], [[1.0]]))
            r.numbers = {"x": 1.0}
            return r

        run.__module__ = mod.__name__
        sys.modules[mod.__name__] = mod
        return run

    def verdicts(n, scale):
        return {"S": doc.Verdict("c", "holds", "")}

    args = argparse.Namespace(seeds=(0,), workdir=str(tmp_path), task="t")
    a_run, b_run = experiment("a"), experiment("b")
    try:
        for run in (a_run, b_run, a_run, b_run):
            harness.run_seeds(run, verdicts, args, {"k": 1})
        assert calls == [("a", 0), ("b", 0)]  # each ran once, then was reused
        kept = sorted(p.name for p in (tmp_path / "seed0").glob("*.pkl"))
        assert kept == ["report_a_t.pkl", "report_b_t.pkl"]
        # the old name (the module's) is read too
        (tmp_path / "seed0" / "report_a_t.pkl").rename(tmp_path / "seed0" / "report_fake_a_t.pkl")
        harness.run_seeds(a_run, verdicts, args, {"k": 1})
        assert calls == [("a", 0), ("b", 0)]
        (tmp_path / "seed0" / "report_b_t.pkl").write_bytes(b"torn")  # unreadable: the seed runs again
        harness.run_seeds(b_run, verdicts, args, {"k": 1})
        assert calls == [("a", 0), ("b", 0), ("b", 0)] and pickle.loads(
            (tmp_path / "seed0" / "report_b_t.pkl").read_bytes())["key"]
    finally:
        sys.modules.pop("fake_a", None)
        sys.modules.pop("fake_b", None)


def test_fluent_errors_and_length_biased_labels() -> None:
    from dpoq_jax.data.synthetic import EOS_ID

    plain = make_task("error_injection", seed=3).preference_examples(200)
    fluent_task = make_task("error_injection", seed=3, error_shift=5, sft_noise=0.5)
    fluent = fluent_task.preference_examples(200)
    for p, f in zip(plain, fluent, strict=True):  # same prompts and error positions, fixed alternative
        assert (p.prompt, p.chosen, p.meta["error_positions"]) == (
            f.prompt,
            f.chosen,
            f.meta["error_positions"],
        )
        for i, (c, r) in enumerate(zip(f.chosen, f.rejected, strict=True)):
            assert r == (str((int(c) + 5) % 10) if i in f.meta["error_positions"] else c)
    sft = fluent_task.sft_examples(2000)
    flips = [
        (s.completion[i] != c)
        for s, e in zip(sft, fluent_task.preference_examples(2000), strict=True)
        for i, c in enumerate(e.chosen)
    ]
    assert abs(np.mean(flips) - 0.5) < 0.02  # the reference sees errors as often as correct digits
    assert all(
        s.completion == e.chosen
        for s, e in zip(make_task("error_injection", seed=3).sft_examples(50), plain[:50], strict=True)
    )
    with pytest.raises(ValueError, match="needs error_shift"):
        make_task("error_injection", sft_noise=0.5)

    def longer_share(lam):
        pairs = make_task("dense_reward", seed=1, label_length_bias=lam).preference_examples(400)
        return np.mean([len(p.chosen) > len(p.rejected) for p in pairs if len(p.chosen) != len(p.rejected)])

    base = make_task("dense_reward", seed=1, bonus=0.0, length_penalty=0.0)
    assert longer_share(5.0) > 0.97 and longer_share(0.0) < longer_share(0.3) < longer_share(5.0)
    # the gold judge ignores the labeller's bias
    y = [13, 14, 15, EOS_ID]
    biased = make_task("dense_reward", seed=1, bonus=0.0, length_penalty=0.0, label_length_bias=2.0)
    assert biased.gold_score("<bos>ab=", y) == base.gold_score("<bos>ab=", y)


# ------------------------------------------------------------------------------------------------
# Each experiment end to end at a tiny scale, one seed (the intervals are tested above): its tables and
# verdicts come out of the command. The four share one workdir, as the full runs do (experiment 3
# reuses experiment 1's runs, experiment 4 experiment 2's).

TINY = {
    "credit": dict(
        sft_steps=4,
        dpo_steps=2,
        settings={"fluent": (0.1,), "surprising": (0.1,)},
        n_eval=8,
        n_gen=4,
        eval_every=1,
    ),
    "implicit": dict(sft_steps=4, dpo_steps=2, beta=0.1, eval_every=1, n_check=4, n_gen=4),
    "search": dict(
        sft_steps=4, dpo_steps=2, betas=(0.3,), beams=(1, 2), alphas=(0.0, 1.0), best_of=2, max_len=40,
        n_prompts=4, eval_every=1,
    ),
}
TINY["dense"] = dict(TINY["search"], n_eval=4)
TINY["dose"] = dict(sft_steps=4, beta=0.1, grid=((1e-3, 1), (1e-3, 2)), n_eval=8, n_val=8, n_gen=4,
                    eval_every=1, rm_steps=2, rm_lr=1e-3, rm_batch=4)  # fmt: skip
# a one-seed table cell: a statistic of items with its item-bootstrap interval, "0.500 [0.400, 0.600]"
IV = r"[0-9.]+ \[[0-9.]+, [0-9.]+\]"
SIV = r"-?[0-9.]+ \[-?[0-9.]+, -?[0-9.]+\]"  # signed (differences, rewards)
VERDICT_RE = r"^\*\*Verdict: (holds|partly|does not hold)\.\*\* .+$"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


def run_tiny(module, scale: dict, root, task: str) -> str:
    from dpoq_jax.experiments import harness

    md = root / f"{module.NAME}.md"
    argv = ["--quick", "--seeds", "0", "--workdir", str(root / task), "--results", str(md)]
    assert harness.experiment_main(module, argv, {"quick": scale}, root) == 0
    return md.read_text()


@pytest.mark.slow
def test_credit_assignment_tiny(tiny_dir) -> None:
    import re

    from dpoq_jax.experiments import credit_assignment as m

    md = run_tiny(m, TINY["credit"], tiny_dir, "error_injection")
    fluent, surprising = (title for title, _ in m.SETTINGS.values())
    assert f"## 1. {fluent}" in md and f"## 2. {surprising}" in md
    for row in ("DPO implicit reward (−r_t)", "policy alone (−log π)", "reference alone (−log π_ref)"):
        assert re.search(rf"^\| {re.escape(row)} \| {IV} \| {IV} \| {IV} \|$", md, flags=re.M), row
    paired = re.escape("| DPO implicit reward − reference alone (paired) |")
    assert re.search(rf"^{paired} {SIV} \| {SIV} \|", md, flags=re.M)
    assert md.count("| reference (SFT) | greedy |") == 2 and md.count("| DPO β=0.1 | sampled |") == 2
    assert md.count("| DPO β=0.1 − reference | greedy |") == 2
    assert len(re.findall(VERDICT_RE, md, flags=re.M)) == 4  # + the answers' verdict per setting
    assert "| β | chosen log-lik. first |" in md and "seeds | 0" in md


@pytest.mark.slow
def test_credit_dose_tiny(tiny_dir) -> None:
    """Experiment 1b end to end (reusing experiment 1's fluent SFT run): the baselines with both reward
    models, the DPO grid and the positive controls at the largest step count, and a verdict."""
    import re

    from dpoq_jax.experiments import credit_dose as m

    md = run_tiny(m, TINY["dose"], tiny_dir, "error_injection")
    for row in ("reference alone (−log π_ref)", "position (later = more suspicious)", "uniform random",
                *m.RM_NAMES.values()):  # fmt: skip
        assert f"| {row} | " in md, row
    arms = (("DPO", 1), ("DPO", 2), ("RPO (DPO + NLL of chosen)", 2), ("SFT on chosen (continued)", 2))
    for arm, steps in arms:
        assert re.search(rf"^\| {re.escape(arm)} \| 0.001 \| {steps} \| {IV} \| ", md, flags=re.M), arm
    assert "| RPO (DPO + NLL of chosen) | 0.001 | 1 |" not in md  # controls at the largest steps only
    assert len(re.findall(VERDICT_RE, md, flags=re.M)) >= 1


@pytest.mark.slow
def test_implicit_rewards_tiny(tiny_dir) -> None:
    import re

    from dpoq_jax.experiments import implicit_rewards as m

    md = run_tiny(m, TINY["implicit"], tiny_dir, "error_injection")
    (v,) = re.findall(VERDICT_RE, md, flags=re.M)
    assert "| (a) reference SFT'd on chosen |" in md and "rejected log-likelihood last" in md
    assert "| DPO (b) reference without SFT | greedy |" in md


@pytest.mark.slow
def test_search_overopt_tiny(tiny_dir) -> None:
    import re

    from dpoq_jax.experiments import search_overopt as m

    md = run_tiny(m, TINY["search"], tiny_dir, "dense_reward")
    assert md.startswith("# Experiment 2") and "## 1. With and without the length bias" in md
    assert len(re.findall(VERDICT_RE, md, flags=re.M)) == 3
    for labels in ("unbiased", "biased"):
        for dec, alpha in (("sample", "–"), ("beam 1", "–"), ("beam 2", "0"), ("beam 2", "1"),
                           ("best of 2 by Σ r_t", "–"), ("best of 2 by mean log π_ref", "–")):  # fmt: skip
            # gold per letter: over answers with a letter (maybe one here: no interval; none: nan)
            cells = rf"{IV} \| {SIV} \| (?:{SIV}|-?[0-9.]+|nan) \| {IV}"
            assert re.search(
                rf"^\| DPO β=0.3 \| {labels} \| {re.escape(dec)} \| {alpha} \| {cells} \|$",
                md,
                flags=re.M,
            ), (labels, dec, alpha)
    assert "| β | α | win 2 − 1 beam | gold 2 − 2 beams | length 2 − 1 beam |" in md
    assert "may run to 40 letters" in md


@pytest.mark.slow
def test_dense_recovery_tiny(tiny_dir) -> None:
    import re

    from dpoq_jax.experiments import dense_recovery as m

    md = run_tiny(m, TINY["dense"], tiny_dir, "dense_reward")
    (v,) = re.findall(VERDICT_RE, md, flags=re.M)
    assert re.search(rf"^\| 0.300 \| [0-9]+ \| ({SIV}|nan) \|", md, flags=re.M)  # 2 steps: maybe no signal


@pytest.mark.slow
def test_token_training_tiny(tmp_path) -> None:
    """Experiment 7 end to end at the tiny scale (every arm, two seeds): the report's tables, both
    intervals, a verdict by the rules; uniform weights train exactly like DPO; a rerun reuses every part."""
    import json
    import re

    from dpoq_jax.experiments import token_training as m

    md = tmp_path / "token_training.md"
    argv = ["--scale", "tiny", "--workdir", str(tmp_path / "w"), "--results", str(md)]
    assert m.main(argv) == 0
    text = md.read_text()
    for label in m.LABELS.values():
        assert f"| {label} | " in text, label
    assert re.search(r"^\*\*Verdict \(dense_reward\): (holds|partly|does not hold|inconclusive)\.\*\* ", text,
                     flags=re.M)  # fmt: skip
    cell = r"[-+][0-9.]+ t\[[-+][0-9.]+, [-+][0-9.]+\] b\[[-+][0-9.]+, [-+][0-9.]+\]"
    assert re.search(rf"^\| tw_oracle-dpo \| {cell} \|$", text, flags=re.M)
    numbers = json.loads(md.with_suffix(".json").read_text())["dense_reward"]
    assert numbers["gold_diff"]["tw_uniform-dpo"]["16"] == [0.0] * 5  # weights of one are DPO, run for run
    assert (tmp_path / "token_training_figures" / "learning_curves.png").stat().st_size > 1000
    evals = sorted((tmp_path / "w").rglob("eval.json"))
    assert len(evals) == 2 * len(m.METHODS)
    stamps = [p.stat().st_mtime_ns for p in evals]
    assert m.main(argv) == 0  # every run and evaluation reused
    assert [p.stat().st_mtime_ns for p in evals] == stamps


def test_judge_lists_the_numbers_a_verdict_read_with_both_intervals(tmp_path) -> None:
    """seeds.judge: the verdicts' result, and a table of exactly the numbers they read (n[k] or n.get),
    in the order read, with the seed-t and bootstrap intervals of a wider interval; the results file
    shows it before the Run table."""
    from dpoq_jax.analysis import document as doc
    from dpoq_jax.analysis import seeds

    rates = [seeds.Items.mean([1.0] * k + [0.0] * (36 - k)) for k in (24, 26, 28)]
    numbers = {"acc": seeds.wider_interval(rates), "kl": seeds.t_interval([1.0, 2.0, 3.0]), "unused": 0.5}

    def verdicts(n):
        ok = n["acc"].above(0.5) and n.get("kl").below(5.0) and n.get("absent") is None
        return {"S": doc.Verdict("claim", "holds" if ok else "does not hold", "why")}

    found, table = seeds.judge(verdicts, numbers)
    assert found["S"].status == "holds"
    assert [r[0] for r in table.rows] == ["acc", "kl"]  # read order; "unused" and "absent" not listed
    t, b = numbers["acc"].parts
    assert table.rows[0][1:] == [str(numbers["acc"]), f"[{doc.fmt(t.lo)}, {doc.fmt(t.hi)}]",
                                 f"[{doc.fmt(b.lo)}, {doc.fmt(b.hi)}]"]  # fmt: skip
    assert table.rows[1][2:] == ["—", "—"]
    report = doc.Report("R", meta={"k": "v"}, inputs=table)
    report.add("S", "text").verdict = found["S"]
    md = report.markdown("figs")
    assert md.index("## Verdict inputs") < md.index("## Run") and "| acc |" in md
    assert "<h2>Verdict inputs</h2>" in report.html()


def test_wider_interval_is_the_wider_of_seed_t_and_bootstrap_inside_the_range() -> None:
    """Seeds that disagree (seed variance dominates): the seed-level t-interval (as scipy computes it) is
    wider than the two-level bootstrap and is used, clipped to [0, 1] for a rate; a statistic with no
    spread is written as the seeds' value, not as a zero-width interval; ranges by kind, hand-solved."""
    import scipy.stats as scipy_stats

    from dpoq_jax.analysis import seeds

    def rate(k: int, n: int = 36) -> seeds.Items:
        return seeds.Items.mean([1.0] * k + [0.0] * (n - k))

    per_seed = [rate(4), rate(18), rate(30)]
    values = [4 / 36, 18 / 36, 30 / 36]
    iv = seeds.wider_interval(per_seed)
    t, boot = iv.parts
    lo, hi = scipy_stats.t.interval(0.95, 2, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert (t.lo, t.hi) == (pytest.approx(lo, abs=1e-3), pytest.approx(hi, abs=1e-3))
    assert boot == seeds.items_interval(per_seed) and t.lo < boot.lo and t.hi > boot.hi
    assert lo < 0 and iv.lo == 0.0 and iv.hi == pytest.approx(min(1.0, hi), abs=1e-3)
    assert iv.mean == pytest.approx(np.mean(values)) and seeds.merge_number(per_seed) == iv
    assert "seed t [" in iv.detail() and "bootstrap [" in iv.detail()

    # the same for a bootstrap statistic (process rewards' weighted items): the same numbers, both parts
    items = [np.r_[np.ones(k), np.zeros(36 - k)] for k in (4, 18, 30)]
    via_stat = seeds.wider_stat_interval(seeds.weighted_mean_stat(items), [36] * 3, (0.0, 1.0))
    assert (via_stat.lo, via_stat.hi) == (iv.lo, pytest.approx(iv.hi)) and via_stat.parts[0] == t
    unclipped = seeds.wider_stat_interval(seeds.weighted_mean_stat(items), [36] * 3)
    assert unclipped.lo == pytest.approx(lo, abs=1e-3) and unclipped.hi == pytest.approx(hi, abs=1e-3)
    one = seeds.wider_stat_interval(seeds.weighted_mean_stat(items[:1]), [36], (0.0, 1.0))
    assert one.parts is None and one == seeds.bootstrap_interval(seeds.weighted_mean_stat(items[:1]), [36])
    # a column with no value in some seeds ("–": not applicable) merges the seeds that have one
    part = seeds.merge_tables([doc.Table(["x"], [[rate(4)]]), doc.Table(["x"], [[seeds.MISSING]]),
                               doc.Table(["x"], [[rate(30)]])])  # fmt: skip
    assert part.rows[0][0] == seeds.wider_interval([rate(4), rate(30)])
    with pytest.raises(ValueError, match="differs between seeds"):
        seeds.merge_tables([doc.Table(["x"], [[rate(4)]]), doc.Table(["x"], [["n/a"]])])
    flat = seeds.merge_number([rate(36)] * 3)
    assert (flat.lo, flat.hi) == (1.0, 1.0) and str(flat) == "1.000 (each of 3 seeds: 1.000)"
    assert seeds.Items.mean([0.2, float("nan"), 0.9]).bounds() == (0.2, 0.9)
    assert (seeds.Items.mean([0.0, 1.0]) - seeds.Items.mean([0.25, 0.5])).bounds() == (-0.5, 0.75)
    assert seeds.Items.auroc([[0.1, 0.2]], [[True, False]]).bounds() == (0.0, 1.0)
    # a per-seed maximum merges as the largest over seeds, with every seed's value, in numbers and tables
    top = seeds.merge_number([seeds.Maximum(-0.3), seeds.Maximum(-0.01), seeds.Maximum(-0.2)])
    assert (top.mean, top.lo, top.hi) == (-0.01, -0.01, -0.01) and not top.above(0) and top.below(0)
    assert str(top) == "-0.010 (largest of 3 seeds: -0.300, -0.010, -0.200)"
    table = seeds.merge_tables([doc.Table(["x"], [[seeds.Maximum(v)]]) for v in (-0.3, 0.2)])
    assert table.rows[0][0].mean == 0.2 and table.rows[0][0].kind == "max"
    with pytest.raises(ValueError, match="Maximum in some seeds"):
        seeds.merge_number([seeds.Maximum(0.1), 0.2])


def test_position_baseline_on_fixed_responses() -> None:
    """The position baseline (later = more suspicious), hand-solved: an error on the last token is its
    top-1 with AUROC 1; on the first token, top-1 0 and AUROC 0; an error at index 2 of 5 tokens ranks
    above 2 of the 4 clean ones (AUROC 0.5); pooled over the three responses (suspicion t across
    responses: the error tokens at t = 3, 0, 2 against the 9 clean ones, ties one half: 7.5 + 1 + 6 of
    27 pairs), AUROC 14.5/27."""
    from dpoq_jax.experiments.credit_assignment import position_values, score_items

    np.testing.assert_array_equal(position_values(4, False), [0.0, -1.0, -2.0, -3.0])
    # a final EOS (never an error) is the least suspicious: the last content token is the top-1
    np.testing.assert_array_equal(position_values(4, True), [0.0, -1.0, -2.0, 1.0])
    assert float(score_items([position_values(4, True)], [[2]])["top1"]) == 1.0
    items = score_items([position_values(n, False) for n in (4, 3, 5)], [[3], [0], [2]])
    assert float(items["top1"]) == pytest.approx(1 / 3)
    assert float(items["auroc_per_response"]) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert float(items["auroc"]) == pytest.approx(14.5 / 27)


def test_a_replaced_results_file_stays_in_the_history_section() -> None:
    """Regenerating a results file keeps the one it replaces (and those before it) at its end, headings
    moved down, figure links dropped, labelled with when it was judged."""
    from dpoq_jax.experiments.harness import HISTORY, with_history

    first = (
        "# Exp: one\n\n## 1. A\n\n| x | 0.5 [0.1, 0.9] |\n\n![fig](f.png)\n\n"
        "| judged at | 2026-12-02 10:00 UTC |\n"
    )
    second = with_history("# Exp: two\n\n## 1. A\n\n| x | 0.7 |\n", first)
    assert second.startswith("# Exp: two") and second.count(HISTORY) == 1
    assert "#### 1. A" in second and "| x | 0.5 [0.1, 0.9] |" in second and "![fig]" not in second
    assert "Exp: one: the file as written on 2026-12-02 10:00 UTC" in second
    third = with_history("# Exp: three\n", second)
    assert third.count(HISTORY) == 1 and third.index("Exp: two") < third.index("Exp: one")
    assert with_history("# new\n", None) == "# new\n"
