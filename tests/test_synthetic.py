"""Synthetic tasks: determinism, tokenizer round trip, gold judges, error positions."""

import numpy as np
import pytest

from dpoq_jax.data.synthetic import (
    EOS_ID,
    DenseRewardTask,
    ErrorInjectionTask,
    SyntheticTokenizer,
    make_task,
)


def test_tokenizer_round_trip():
    tok = SyntheticTokenizer()
    text = "<bos>s:3017=0137<eos>abp:=|<pad>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids[0] == tok.bos_token_id and tok.encode("<eos>") == [tok.eos_token_id]
    assert max(ids) < tok.vocab_size == 42
    assert tok.decode(ids, skip_special_tokens=True) == "s:3017=0137abp:=|"
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("abZ")


@pytest.mark.parametrize("name", ["error_injection", "dense_reward"])
def test_deterministic_and_splits_differ(name):
    a = make_task(name, seed=3).preference_examples(20)
    b = make_task(name, seed=3).preference_examples(20)
    c = make_task(name, seed=4).preference_examples(20)
    v = make_task(name, seed=3).preference_examples(20, split="validation")
    assert a == b
    assert a != c and a != v
    assert make_task(name, seed=3).preference_examples(10) == a[:10]  # prefix-stable


def test_error_injection_rules_and_positions():
    task = ErrorInjectionTask(seed=1)
    tok = task.tokenizer
    exs = task.preference_examples(200)
    assert {e.meta["rule"] for e in exs} == {"copy", "sort", "add1", "reverse"}
    for e in exs:
        rule, digits = e.prompt[5], e.prompt[7:-1]
        want = {
            "c": digits,
            "s": "".join(sorted(digits)),
            "r": digits[::-1],
            "a": "".join(str((int(d) + 1) % 10) for d in digits),
        }[rule]
        assert e.chosen == want
        diff = [i for i, (x, y) in enumerate(zip(e.chosen, e.rejected, strict=True)) if x != y]
        assert diff == e.meta["error_positions"] and 1 <= len(diff) <= 2
        c_ids = tok.encode(e.chosen) + [EOS_ID]
        r_ids = tok.encode(e.rejected) + [EOS_ID]
        assert task.gold_score(e.prompt, c_ids) == 1.0
        assert task.gold_score(e.prompt, r_ids) < 1.0
        rr = task.gold_token_rewards(e.prompt, r_ids)
        assert np.nonzero(rr)[0].tolist() == e.meta["error_positions"]
        assert np.all(task.gold_token_rewards(e.prompt, c_ids) == 0)


def test_error_injection_judge_any_response():
    task = ErrorInjectionTask()
    tok = task.tokenizer
    prompt = "<bos>s:312="
    assert task.gold_score(prompt, tok.encode("123<eos>")) == 1.0
    # too long: the extra token and the misplaced EOS are wrong
    np.testing.assert_array_equal(task.gold_token_rewards(prompt, tok.encode("1234<eos>")), [0, 0, 0, -1, -1])
    assert task.gold_score(prompt, tok.encode("1234<eos>")) == pytest.approx(1 - 2 / 5)
    assert task.gold_score(prompt, tok.encode("12")) == pytest.approx(0.5)  # missing "3" and EOS
    assert task.gold_score(prompt, []) == 0.0


def test_dense_reward_definition():
    task = DenseRewardTask(seed=0)
    tok = task.tokenizer
    logits, W = task._tables()
    prompt = "<bos>ab="
    resp = tok.encode("cd<eos>")
    b, c, d = 1, 2, 3
    want = [W[b, c] + task.bonus, W[c, d] + task.bonus, 0.0]
    np.testing.assert_allclose(task.gold_token_rewards(prompt, resp), want)
    # beyond the limit the same letter costs the penalty instead of earning the bonus
    long = tok.encode("c" * 20)
    r = task.gold_token_rewards(prompt, long)
    np.testing.assert_allclose(r[16:], W[c, c] - task.length_penalty)
    np.testing.assert_allclose(r[1:16], W[c, c] + task.bonus)
    # reference policy: no EOS before min_len, forced at max_len, normalised
    for t in (0, 5, task.max_len):
        p = task.reference_next_probs(b, t)
        assert p.sum() == pytest.approx(1.0)
    assert task.reference_next_probs(b, 0)[EOS_ID] == 0.0
    assert task.reference_next_probs(b, task.max_len)[EOS_ID] == 1.0


def test_dense_reward_preferences_follow_gold():
    task = DenseRewardTask(seed=0)
    tok = task.tokenizer
    exs = task.preference_examples(400)
    rc = np.array([task.gold_score(e.prompt, tok.encode(e.chosen) + [EOS_ID]) for e in exs])
    rr = np.array([task.gold_score(e.prompt, tok.encode(e.rejected) + [EOS_ID]) for e in exs])
    np.testing.assert_allclose(rc, [e.meta["chosen_reward"] for e in exs])
    # Bradley–Terry labels: the gold judge agrees with most labels, as often as BT predicts
    agree = np.mean(rc > rr)
    expected = np.mean(1 / (1 + np.exp(-np.abs(rc - rr))))
    assert agree > 0.7 and abs(agree - expected) < 0.06
    lengths = np.array([len(e.chosen) for e in exs] + [len(e.rejected) for e in exs])
    assert lengths.min() >= task.min_len and np.mean(lengths >= task.gold_len_limit) < 0.08
    # inside the data longer is better; beyond the limit the gold reward falls
    inside = lengths < task.gold_len_limit
    assert np.corrcoef(lengths[inside], np.concatenate([rc, rr])[inside])[0, 1] > 0.2


def test_sft_splits():
    e = ErrorInjectionTask().sft_examples(5)
    assert [x.completion for x in e] == [x.chosen for x in ErrorInjectionTask().preference_examples(5)]
    d = DenseRewardTask().sft_examples(5, responses="all")
    assert len(d) == 10 and len(DenseRewardTask().sft_examples(5, responses="chosen")) == 5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_reward_best_gold_peaks_at_the_length_limit(seed):
    """Over-optimisation by design: the best achievable gold reward of a response of L letters rises
    with L up to gold_len_limit and falls after it, while the data prefers the longer response."""
    task = DenseRewardTask(seed=seed)
    tok = task.tokenizer
    _, W = task._tables()
    # dynamic programme over (length, last letter), starting after the prompt letter `start`
    start = 0
    best, back, values = W[start] + task.bonus, [], []
    for L in range(1, 33):
        if L > 1:
            extra = task.bonus if L - 1 < task.gold_len_limit else -task.length_penalty
            cand = best[:, None] + W + extra
            back.append(cand.argmax(0))
            best = cand.max(0)
        # the argmax path of length L, scored by the task's own gold judge (EOS adds 0)
        a = int(best.argmax())
        path = [a]
        for bp in reversed(back):
            path.append(int(bp[path[-1]]))
        letters = [13 + x for x in reversed(path)]
        assert task.gold_score("<bos>a=", letters + [tok.eos_token_id]) == pytest.approx(best.max())
        values.append(best.max())
    v = np.array(values)
    assert int(v.argmax()) + 1 == task.gold_len_limit
    assert np.all(np.diff(v[: task.gold_len_limit]) > 0) and np.all(np.diff(v[task.gold_len_limit - 1 :]) < 0)
    exs = task.preference_examples(300)
    lc, lr = np.array([len(e.chosen) for e in exs]), np.array([len(e.rejected) for e in exs])
    assert np.mean((lc > lr)[lc != lr]) > 0.6


def test_synthetic_jsonl_round_trip(tmp_path):
    from dpoq_jax.data.jsonl import read_preference_jsonl, write_jsonl

    exs = ErrorInjectionTask(seed=5).preference_examples(6)
    write_jsonl(
        tmp_path / "s.jsonl", [{"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected} for e in exs]
    )
    back = read_preference_jsonl(tmp_path / "s.jsonl")
    assert [(b.prompt, b.chosen, b.rejected) for b in back] == [(e.prompt, e.chosen, e.rejected) for e in exs]
