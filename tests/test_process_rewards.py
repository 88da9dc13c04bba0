"""The arithmetic_chain task (steps with known correctness), its step parser, the bootstrap intervals of
bounded metrics, and the implicit-process-rewards experiment end to end at a tiny scale (issue #25)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dpoq_jax.analysis import seeds, stats
from dpoq_jax.analysis import text_steps as st
from dpoq_jax.data.synthetic import ArithmeticChainTask, SyntheticTokenizer, make_task, split_steps


def test_correct_solution_parses_as_correct() -> None:
    task = make_task("arithmetic_chain", seed=3)
    for e in task.preference_examples(200, "test"):
        c = task.check_solution(e.prompt, e.chosen)
        assert c.first_error is None and c.correct and not any(c.step_errors)
        v0, op, x, n = task.parse_prompt(e.prompt)
        assert c.answer == task.values(v0, op, x, n)[-1] and len(split_steps(e.chosen)) == n
    # by hand: 5 + 3 = 8, 8 + 3 = 11 -> 1, 1 + 3 = 4
    assert task.solution_text("a", 3, task.values(5, "a", 3, 3)) == "1a3=8|2a3=1|3a3=4"
    assert task.check_solution("<bos>5a3:3=", "1a3=8|2a3=1|3a3=4<eos>").answer == 4


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_injected_error_is_found_at_its_step_and_the_answer_is_wrong(k: int) -> None:
    task = ArithmeticChainTask()
    v0, op, x, n = 7, "s", 4, 5
    right = task.values(v0, op, x, n)
    for wrong in {(right[k] + d) % 10 for d in range(1, 10)}:
        vals = task.with_error(v0, op, x, n, k, wrong)
        prompt, text = task.prompt_text(v0, op, x, n), task.solution_text(op, x, vals)
        c = task.check_solution(prompt, text)
        assert c.first_error == k and not c.correct and c.answer == vals[-1] != right[-1]
        # later steps are computed consistently from the wrong value: only step k is locally wrong
        assert c.step_errors == [i == k for i in range(n)]
    with pytest.raises(ValueError, match="true value"):
        task.with_error(v0, op, x, n, k, right[k])
    # the task's own pairs record where the error is
    for e in task.preference_examples(100, "validation"):
        assert task.check_solution(e.prompt, e.rejected).first_error == e.meta["first_error"]


def test_parser_handles_malformed_missing_and_extra_steps() -> None:
    task = ArithmeticChainTask()
    p = "<bos>5a3:3="
    assert split_steps("1a3=8|2a3=1|3a3=4") == ["1a3=8|", "2a3=1|", "3a3=4"]
    assert split_steps("1a3=8||") == ["1a3=8|", "|"]
    cases = {
        "1a3=8|2a3=1": (1, None),  # too few steps, all right: the last one claims a wrong answer
        "1a3=8|2a3=1|3a3=4|4a3=7": (3, None),  # an extra step
        "1a3=8|2a4=1|3a3=4": (1, 4),  # wrong operand copied; the final answer is still right
        "1a3=8|2a3=11|3a3=4": (1, 4),  # malformed value
        "1a3=8|3a3=1|3a3=4": (1, 4),  # wrong step number
        "1a3=8|2a3=1|3a3=": (2, None),  # malformed last step: no answer
        "": (0, None),
        "1a3=9|2a3=2|3a3=5": (0, 5),
    }
    for text, (first, answer) in cases.items():
        c = task.check_solution(p, text)
        assert (c.first_error, c.answer, c.correct) == (first, answer, answer == 4), text
    # the parser's steps are analysis.text_steps' steps with spec "|" (EOS joins the last step)
    tok = SyntheticTokenizer()
    for text in ("1a3=8|2a3=1|3a3=4", "1a3=8||", "1a3=8|2a3=1|"):
        seg = st.segment(tok, tok.encode(text) + [tok.eos_token_id], st.parse_spec("|"))
        assert [t.replace("<eos>", "") for t in seg.texts if t != "<eos>"] == split_steps(text)
    with pytest.raises(ValueError, match="not an arithmetic_chain prompt"):
        task.check_solution("<bos>5x3:3=", "")


def test_sft_error_rates_are_the_ones_asked() -> None:
    task = ArithmeticChainTask(seed=1, error_rate=0.1, hard_error_rate=0.6)
    exs = task.sft_examples(6000)
    hard = easy = hard_err = easy_err = 0
    for e in exs:
        errs, hs = set(e.meta["error_steps"]), set(e.meta["hard_steps"])
        n = len(split_steps(e.completion))
        hard, easy = hard + len(hs), easy + n - len(hs)
        hard_err, easy_err = hard_err + len(errs & hs), easy_err + len(errs - hs)
        c = task.check_solution(e.prompt, e.completion)
        assert c.first_error == e.meta["first_error"] and c.correct == e.meta["correct"]
        assert [i for i, b in enumerate(c.step_errors) if b] == e.meta["error_steps"]
    for k, n, p in ((hard_err, hard, 0.6), (easy_err, easy, 0.1)):  # within 4 binomial standard errors
        assert abs(k / n - p) < 4 * math.sqrt(p * (1 - p) / n), (k, n, p)
    assert 0.1 < np.mean([e.meta["correct"] for e in exs]) < 0.5  # the reference's data is often wrong
    # the same problems at any rate; no errors at rate 0
    clean = ArithmeticChainTask(seed=1, error_rate=0.0, hard_error_rate=0.0).sft_examples(50)
    assert [e.prompt for e in clean] == [e.prompt for e in exs[:50]]
    assert all(task.check_solution(e.prompt, e.completion).correct for e in clean)


def test_held_out_problems_are_never_trained_on() -> None:
    task = ArithmeticChainTask(seed=2)
    sizes = {k: len(task.problems(k)) for k in ("train", "validation", "test")}
    assert sizes == {"train": 520, "validation": 80, "test": 200}
    train = {e.prompt for e in task.sft_examples(3000)} | set(task.prompts(1000, "train"))
    test, val = set(task.prompts(200, "test")), set(task.prompts(80, "validation"))
    assert (
        len(test) == 200 and len(val) == 80 and not (train & test) and not (train & val) and not (test & val)
    )
    assert {e.prompt for e in task.preference_examples(300, "test")} <= test
    assert task.problems("test") != ArithmeticChainTask(seed=3).problems("test")  # the split follows the seed


def test_task_is_registered_and_fits_its_config() -> None:
    from dpoq_jax.configs.synthetic import get_config
    from dpoq_jax.data.sources import SourceConfig, load_examples

    cfg = get_config("arithmetic_chain:sft")
    assert (cfg.data.source, cfg.data.task) == ("synthetic", "arithmetic_chain")
    exs, _ = load_examples(SourceConfig(source="synthetic", task="arithmetic_chain", num_examples=5), "sft")
    assert len(exs) == 5 and exs[0].prompt.startswith("<bos>")
    task = ArithmeticChainTask()
    longest = max(len(SyntheticTokenizer().encode(e.completion)) + 1 for e in task.sft_examples(500))
    assert longest == task.max_response_tokens <= cfg.data.response_len
    assert max(len(SyntheticTokenizer().encode(p)) for p in task.prompts(100)) <= cfg.data.max_prompt_tokens
    with pytest.raises(ValueError, match="hard_error_rate"):
        ArithmeticChainTask(hard_error_rate=1.5)


def test_bootstrap_interval_of_a_proportion_near_wilson_and_inside_its_range() -> None:
    # one seed, 100 items, 30 successes: hand-computed Wilson 95% interval [0.2189, 0.3958]
    lo, hi = stats.wilson_interval(30, 100)
    assert (lo, hi) == pytest.approx((0.21894885, 0.39584855), abs=1e-6)
    x = [np.r_[np.ones(30), np.zeros(70)]]
    iv = seeds.bootstrap_interval(seeds.weighted_mean_stat(x), [100], n_boot=4000, seed=1)
    assert (
        iv.mean == pytest.approx(0.3)
        and iv.lo == pytest.approx(lo, abs=0.02)
        and iv.hi == pytest.approx(hi, abs=0.02)
    )
    # bounded: all successes stay at 1, never above
    ones = seeds.bootstrap_interval(seeds.weighted_mean_stat([np.ones(20), np.ones(5)]), [20, 5], n_boot=200)
    assert (ones.mean, ones.lo, ones.hi) == (1.0, 1.0, 1.0)
    # seeds that disagree widen the interval beyond the items' own
    a = seeds.weighted_mean_stat([np.r_[np.ones(90), np.zeros(10)], np.r_[np.ones(10), np.zeros(90)]])
    two = seeds.bootstrap_interval(a, [100, 100], n_boot=2000)
    assert two.mean == pytest.approx(0.5) and two.lo < 0.2 and two.hi > 0.8 and 0 <= two.lo <= two.hi <= 1


def test_weighted_auroc_matches_auroc_and_ranks() -> None:
    from dpoq_jax.experiments import process_rewards as pr

    rng = np.random.default_rng(0)
    score = np.round(rng.normal(size=300), 1)  # ties
    label = rng.random(300) < 0.3 + 0.2 * (score > 0)
    raw = {"ev": {"step_score": {"k": score}, "step_label": label, "step_cand": np.arange(300),
                  "prompt": np.arange(300) // 10}, "n_prompts": 30}  # fmt: skip
    stat = pr.weighted_auroc_stat([raw], "k")
    assert stat(0, np.ones((1, 30)))[0] == pytest.approx(stats.auroc(score, label))
    w = np.zeros((1, 30))
    w[0, :3] = [2, 1, 1]  # prompt 0 twice, 1 and 2 once: the AUROC of the repeated steps
    keep = np.r_[np.arange(10), np.arange(30)]
    assert stat(0, w)[0] == pytest.approx(stats.auroc(score[keep], label[keep]))


@pytest.mark.slow
def test_process_rewards_tiny_end_to_end(tmp_path) -> None:
    """SFT (120 steps, batch 16) -> sample and label -> DPO and outcome-CE PRMs (3 steps) -> held-out step
    rewards,
    localisation, best-of-N, intervals and verdicts; every table in the results file (≈ 60 s)."""
    from dpoq_jax.experiments import process_rewards as pr

    scale = dict(sft_steps=120, n_train_prompts=16, n_train_cands=8, pairs_per_prompt=2, beta=0.1,
                 dpo=dict(lr=1e-3, steps=3), ce=dict(lr=1e-3, steps=3), sweep=((1e-3, 3),),
                 n_val_prompts=4, n_val_cands=4, n_test_prompts=6, n_test_cands=16, ns=(1, 4, 16, 64),
                 bon_repeats=2, n_boot=50)  # fmt: skip
    md = tmp_path / "process_rewards.md"
    argv = [
        "--quick",
        "--seeds",
        "0",
        "--workdir",
        str(tmp_path / "w"),
        "--results",
        str(md),
        "--sweep",
        "--config.train.batch_size=16",
    ]
    assert pr.main(argv, {"quick": scale}, tmp_path) == 0
    text = md.read_text()
    for title in pr.SECTION.values():
        assert title in text, title
    for needle in ("| step scorer | AUROC | first-error acc.", "| selector | N = 1 | N = 4 | N = 16 |",
                   "| comparison | N | difference |", "| PRM | lr | steps |",
                   "threshold (tuned on validation)",
                   "dpo:min", "ce:vote", "reference likelihood", "| reference likelihood per token |",
                   "majority vote", "oracle (any correct)",
                   "**Verdict: ", "two-level bootstrap", "| position (later step = more suspicious) |",
                   "− position (later step = more suspicious) |", "minus the position's",
                   "| token BT reward model step reward |", "| outcome BT reward model step credit |",
                   "| token_rm:min |", "| outcome_rm:sum |", "best-of-N: dpo:min − token_rm:min",
                   "− token BT reward model step reward |", "the wider of two 95% intervals"):  # fmt: skip
        assert needle in text, needle
    assert "N = 64" not in text  # only N up to the candidates drawn
    assert text.count("**Verdict: ") == 2
    raw = (tmp_path / "w" / "seed0" / pr.RAW_FILE).exists()
    assert raw
    # a second call reuses the finished seed (and its runs) and writes the same tables
    first = text.split("## Run")[0]
    assert pr.main(argv, {"quick": scale}, tmp_path) == 0
    assert md.read_text().split("## Run")[0] == first


def test_process_reward_verdicts_need_every_check_and_give_both_intervals() -> None:
    """claim_verdicts on hand-made intervals: localisation holds only when each PRM beats 0.5, the
    reference and the position; its text names the seed-t and bootstrap intervals of each check."""
    from dpoq_jax.experiments import process_rewards as pr

    def iv(lo: float, hi: float) -> seeds.Interval:
        m = (lo + hi) / 2
        t, b = seeds.Interval(m, lo, hi, 5), seeds.Interval(m, lo + 0.01, hi - 0.01, 500)
        return seeds.Interval(m, lo, hi, 500, parts=(t, b))

    good = {f"{k}/{m}": iv(0.6, 0.8) if k == "auroc" else iv(0.05, 0.1)
            for m in pr.MODELS for k in ("auroc", "auroc_diff", "auroc_diff_pos")}  # fmt: skip
    good |= {f"diff/{m}/{b}/{n}": iv(0.01, 0.02) for m in pr.MODELS
             for b in (f"{m}:sum", "majority vote", "reference likelihood") for n in (16, 64)}  # fmt: skip
    v = pr.claim_verdicts(good, (1, 16, 64))
    assert [x.status for x in v.values()] == ["holds", "holds"]
    assert "seed t [" in v[pr.SECTION["loc"]].why and "bootstrap [" in v[pr.SECTION["diff"]].why
    lost = good | {"auroc_diff_pos/ce": iv(-0.1, 0.05)}  # CE does not beat the position
    assert pr.claim_verdicts(lost, (1, 16, 64))[pr.SECTION["loc"]].status == "partly"
