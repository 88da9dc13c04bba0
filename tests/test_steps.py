"""Implicit process rewards: dpoq_jax/prm.py (step sums, cumulative Q, aggregations, vote) against
hand-solved values, text steps mapped to tokens (analysis/text_steps.py), `dpoq score --steps` and
`dpoq rerank` end to end on tiny random models, and each bad input as one line."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest
from helpers import assert_one_error, run, save_tiny_model, write_jsonl

from dpoq_jax import cli, prm
from dpoq_jax.analysis import text_steps as st

# ------------------------------------------------------------------------------------------------
# the core, hand-solved (dyadic values: float32 sums are exact)

# row 0: 2 prompt tokens, then 5 response tokens in steps 0 0 1 2 2
# row 1: 1 prompt token, 3 response tokens in steps 0 1 1, then 3 padding
REWARDS_BT = np.array(
    [[9.0, 9.0, 0.5, -1.0, 2.0, 0.25, -0.75], [9.0, 1.5, -2.0, 0.125, 7.0, 7.0, 7.0]], np.float32
)
STEP_IDS_BT = np.array([[-1, -1, 0, 0, 1, 2, 2], [-1, 0, 1, 1, -1, -1, -1]])
MASK_BT = STEP_IDS_BT >= 0
STEP_REWARDS = [[-0.5, 2.0, -0.5, 0.0], [1.5, -1.875, 0.0, 0.0]]  # by hand: sums of each step's tokens
EXPECTED = {
    "min": [-0.5, -1.875],
    "sum": [1.0, -0.375],  # = Σ_t r_t of the response: the outcome reward
    "last": [-0.5, -1.875],
    "mean": [1.0 / 3.0, -0.1875],
}


def test_step_rewards_and_every_aggregation_hand_solved():
    r_BK, m_BK = prm.step_rewards(REWARDS_BT, STEP_IDS_BT, 4)
    np.testing.assert_array_equal(np.asarray(r_BK), STEP_REWARDS)
    np.testing.assert_array_equal(np.asarray(m_BK), [[1, 1, 1, 0], [1, 1, 0, 0]])
    for how, want in EXPECTED.items():
        np.testing.assert_allclose(np.asarray(prm.aggregate(r_BK, m_BK, how)), want, rtol=1e-7, err_msg=how)
    np.testing.assert_array_equal(  # the sum of steps is the outcome reward, Σ of the masked token rewards
        np.asarray(prm.aggregate(r_BK, m_BK, "sum")), (REWARDS_BT * MASK_BT).sum(-1)
    )
    with jax.enable_x64(True):  # float64 in, float64 out: the mean pinned to the last bit
        r64_BK, m64_BK = prm.step_rewards(REWARDS_BT.astype(np.float64), STEP_IDS_BT, 4)
        mean = np.asarray(prm.aggregate(r64_BK, m64_BK, "mean"))
        assert mean.dtype == np.float64 and mean.tolist() == EXPECTED["mean"]
    with pytest.raises(ValueError, match="how must be one of"):
        prm.aggregate(r_BK, m_BK, "max")
    # a response without any step scores 0 under every aggregation
    none_BK = np.zeros((1, 4), bool)
    for how in prm.AGGREGATES:
        assert float(prm.aggregate(np.ones((1, 4), np.float32), none_BK, how)[0]) == 0.0


def test_cumulative_q_and_its_differences_are_the_step_rewards():
    q_BT = np.asarray(prm.cumulative_q(REWARDS_BT, MASK_BT))
    np.testing.assert_array_equal(q_BT[0], [0, 0, 0.5, -0.5, 1.5, 1.75, 1.0])
    np.testing.assert_array_equal(q_BT[1], [0, 1.5, -0.5, -0.375, -0.375, -0.375, -0.375])
    for b in range(2):  # q at a step's last token − q before its first = the step's reward
        for k in range(int(STEP_IDS_BT[b].max()) + 1):
            idx = np.flatnonzero(STEP_IDS_BT[b] == k)
            assert q_BT[b, idx[-1]] - q_BT[b, idx[0] - 1] == STEP_REWARDS[b][k]


# ------------------------------------------------------------------------------------------------
# text steps mapped to tokens


class PieceTokenizer:
    """A fake tokenizer whose tokens are the given strings (or bytes, decoded as UTF-8 with
    replacement characters, like a byte-level BPE's decode of a partial character)."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids):
        parts = [self.pieces[i] for i in ids]
        if parts and isinstance(parts[0], bytes):
            return b"".join(parts).decode("utf-8", errors="replace")
        return "".join(parts)


def _segment(pieces, spec):
    return st.segment(PieceTokenizer(pieces), list(range(len(pieces))), st.parse_spec(spec))


def test_a_token_straddling_a_boundary_belongs_to_the_step_where_it_ends():
    seg = _segment(["a", "b", "3\n4", "c", "\n", "d"], "newline")  # text "ab3\n4c\nd"
    assert seg.step_ids == [0, 0, 1, 1, 1, 2]  # "3\n4" ends after the first newline: step 1
    assert seg.ranges == [(0, 2), (2, 5), (5, 6)]
    assert seg.texts == ["ab", "3\n4c\n", "d"] and "".join(seg.texts) == seg.text
    # a token holding a whole text step (and more) merges it into the step where the token ends
    seg = _segment(["1\n2\n3", "\n", "x"], "newline")
    assert seg.step_ids == [0, 0, 1] and seg.texts == ["1\n2\n3\n", "x"]


def test_multibyte_character_split_over_tokens():
    # "x\néy\nz" in bytes; token 1 holds "\n" and the first byte of "é", token 2 its second byte
    seg = _segment([b"x", b"\n\xc3", b"\xa9y", b"\n", b"z"], "newline")
    assert st.token_ends(PieceTokenizer([b"x", b"\n\xc3", b"\xa9y"]), [0, 1, 2])[1] == [1, 2, 4]
    assert seg.step_ids == [0, 0, 1, 1, 2]
    assert seg.texts == ["x\n", "éy\n", "z"]


def test_segmentation_by_regex_and_by_delimiter():
    chars = list("Step 1: a. Step 2: b. Done")
    seg = _segment(chars, r"re:\.\s")  # each match ends a step; the delimiter stays with its step
    assert seg.texts == ["Step 1: a. ", "Step 2: b. ", "Done"] and seg.cut
    assert _segment(list("1|22|3"), "|").texts == ["1|", "22|", "3"]  # a literal delimiter
    assert _segment(list("ab.c"), ".").texts == ["ab.", "c"]  # literal: "." is no regex here
    # "newline" is a run of newlines (blank lines make no empty steps); a literal "\n" is each one
    assert _segment(list("a\n\nb\n"), "newline").texts == ["a\n\n", "b\n"]
    assert _segment(list("a\n\nb\n"), "\n").texts == ["a\n", "\n", "b\n"]
    # nothing matched (or only empty matches): one step, and `cut` says so
    for spec in ("re:z", "re:x*", "newline"):
        seg = _segment(list("abc"), spec)
        assert seg.texts == ["abc"] and seg.step_ids == [0, 0, 0] and not seg.cut, spec
    with pytest.raises(ValueError, match="matches nothing inside any of the 2 responses"):
        st.check_cut([_segment(list("abc"), "re:z")] * 2, "re:z", "f.jsonl")
    with pytest.raises(ValueError, match=r"--steps 're:\(': not a regular expression"):
        st.parse_spec("re:(")


# ------------------------------------------------------------------------------------------------
# weighted majority vote


def test_vote_weights_and_deterministic_ties():
    # count: "7" and "8" have two votes each; the tie goes to the answer seen first ("7", candidate 0),
    # and within "7" to its best-scoring candidate (3)
    chosen, votes = prm.weighted_vote(["7", "8", "8", "7", None], np.array([0.0, 5, 5, 1, 9]), "count")
    assert (chosen, votes) == (3, {"7": 2.0, "8": 2.0})
    # the same tie, same scores inside the group: the first candidate
    assert prm.weighted_vote(["a", "a", "b"], np.zeros(3), "count")[0] == 0
    assert prm.weighted_vote(["b", "a", "a", "b"], np.zeros(4), "count")[0] == 0
    # sigmoid: one confident "a" (σ(4) + σ(−4) = 1) against two lukewarm "b" (2σ(0) = 1) ties too ...
    chosen, votes = prm.weighted_vote(["b", "a", "b", "a"], np.array([0.0, 4, 0, -4]))
    assert votes["a"] == pytest.approx(1.0, abs=1e-12) and votes["b"] == 1.0
    # ... and more confidence on "a" wins it, choosing its best candidate
    chosen, votes = prm.weighted_vote(["b", "a", "b", "a"], np.array([0.0, 4, 0, -3]))
    assert chosen == 1 and votes["a"] == pytest.approx(1 / (1 + math.exp(-4)) + 1 / (1 + math.exp(3)))
    # no answers at all: the best score
    assert prm.weighted_vote([None, None], np.array([1.0, 2.0])) == (1, {})


# ------------------------------------------------------------------------------------------------
# `dpoq score --steps` and `dpoq rerank` on tiny random models (synthetic tokenizer: one token a
# character, so a step is the characters up to and including each "|", EOS in the last step)

PROMPTS = ["c:12=", "a:3="]
CANDIDATES = [["1|2|3", "45|3", "7|89", "0|9|9"], ["4|4", "56", "1|2|9"]]
BETA = 0.5
FLAT = [{"prompt": p, "response": c} for p, cs in zip(PROMPTS, CANDIDATES, strict=True) for c in cs]


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("ref"), seed=1)


def _steps_of_tokens(tokens, rewards):
    """Step rewards by hand from the scored tokens: a step ends after each "|"."""
    out, acc = [], 0.0
    for t, r in zip(tokens, rewards, strict=True):
        acc += r
        if t == "|":
            out.append(acc)
            acc = 0.0
    return out + [acc]


def _aggregates(step_rewards):
    s = np.asarray(step_rewards, np.float64)
    return {"min": s.min(), "sum": s.sum(), "last": s[-1], "mean": s.mean()}


def _by_prompt(responses, value):
    """value(response) of each candidate, as one list per prompt."""
    out, n = [], 0
    for cands in CANDIDATES:
        out.append([value(r) for r in responses[n : n + len(cands)]])
        n += len(cands)
    return out


def _step_score(how):
    return lambda r: _aggregates(_steps_of_tokens(r["tokens"], r["rewards"]))[how]


@pytest.fixture(scope="module")
def scored(tmp_path_factory, model_dir, ref_dir):
    """`dpoq score --steps |` of every candidate: per candidate its token rewards, ref log-probs and steps."""
    d = tmp_path_factory.mktemp("score")
    write_jsonl(d / "p.jsonl", *FLAT)
    argv = ["score", "--policy", str(model_dir), "--reference", str(ref_dir), "--pairs", str(d / "p.jsonl"),
            "--beta", str(BETA), "--steps", "|", "--out-dir", str(d / "out")]  # fmt: skip
    assert run_ok(argv)
    report = json.loads((d / "out" / "scores.json").read_text())
    return [it["responses"]["response"] for it in report["items"]], (d / "out" / "report.html").read_text()


def run_ok(argv):
    return cli.main(argv) == 0


def test_score_steps_in_json_and_html(scored):
    responses, page = scored
    for r in responses:
        s = r["steps"]
        by_hand = _steps_of_tokens(r["tokens"], r["rewards"])
        np.testing.assert_allclose(s["rewards"], by_hand, rtol=1e-5, atol=1e-6)
        for how, want in _aggregates(by_hand).items():
            assert s[how] == pytest.approx(want, rel=1e-5, abs=1e-6), how
        assert s["sum"] == pytest.approx(sum(r["rewards"]), rel=1e-5, abs=1e-6)
        assert "".join(s["texts"]) == "".join(r["tokens"]) and s["spec"] == "|"
        assert s["ranges"][0][0] == 0 and s["ranges"][-1][1] == len(r["ids"])
    n_steps = sum(len(r["steps"]["ranges"]) for r in responses)
    assert page.count('<span class="step"') == n_steps and "3 steps, min" in page


def _rerank(tmp_path, model_dir, ref_dir, *extra, records=None):
    f = tmp_path / "cands.jsonl"
    if records is None:
        pairs = enumerate(zip(PROMPTS, CANDIDATES, strict=True))
        records = [{"prompt": p, "candidates": cs, "id": i} for i, (p, cs) in pairs]
    write_jsonl(f, *records)
    out = tmp_path / "best.jsonl"
    argv = ["rerank", "--policy", str(model_dir), "--reference", str(ref_dir), "--candidates", str(f),
            "--beta", str(BETA), "--out", str(out), *extra]  # fmt: skip
    assert run_ok(argv)
    return [json.loads(x) for x in out.read_text().splitlines()]


@pytest.mark.parametrize("how", ["min", "last"])
def test_rerank_chooses_the_argmax_of_independently_computed_scores(tmp_path, model_dir, ref_dir, scored,
                                                                    how):  # fmt: skip
    lines = _rerank(tmp_path, model_dir, ref_dir, "--steps", "|", "--aggregate", how)
    for line, cands, want in zip(lines, CANDIDATES, _by_prompt(scored[0], _step_score(how)), strict=True):
        np.testing.assert_allclose(line["scores"], want, rtol=1e-5, atol=1e-6)
        assert line["chosen"] == int(np.argmax(want)) and line["candidate"] == cands[line["chosen"]]
        assert line["aggregate"] == how and line["baseline"] is None
        assert len(line["step_rewards"]) == len(cands)
    assert [x["meta"] for x in lines] == [{"id": 0}, {"id": 1}]
    # the one-candidate-a-line form gives the same
    again = _rerank(tmp_path, model_dir, ref_dir, "--steps", "|", "--aggregate", how, records=FLAT)
    assert [x["scores"] for x in again] == [x["scores"] for x in lines]


def test_rerank_baseline_reference_ranks_by_reference_log_likelihood(tmp_path, model_dir, ref_dir, scored):
    lines = _rerank(tmp_path, model_dir, ref_dir, "--baseline", "reference", "--aggregate", "sum")
    for line, want in zip(lines, _by_prompt(scored[0], lambda r: sum(r["ref_logps"])), strict=True):
        np.testing.assert_allclose(line["scores"], want, rtol=1e-5)
        assert line["chosen"] == int(np.argmax(want)) and line["baseline"] == "reference"


def test_rerank_vote(tmp_path, model_dir, ref_dir, scored):
    lines = _rerank(tmp_path, model_dir, ref_dir, "--steps", "|", "--aggregate", "vote",
                    "--answer-regex", "([0-9])$")  # fmt: skip
    for line, cands, mins in zip(lines, CANDIDATES, _by_prompt(scored[0], _step_score("min")), strict=True):
        answers = [c[-1] for c in cands]
        totals: dict[str, float] = {}
        for a, s in zip(answers, mins, strict=True):
            totals[a] = totals.get(a, 0.0) + 1 / (1 + math.exp(-s))
        assert line["answers"] == answers and line["votes"] == pytest.approx(totals, rel=1e-5)
        best = max(totals, key=lambda a: (totals[a], -answers.index(a)))
        members = [i for i, a in enumerate(answers) if a == best]
        assert line["chosen"] == max(members, key=lambda i: (mins[i], -i))


# ------------------------------------------------------------------------------------------------
# bad input: one line naming file and line, status 1


@pytest.mark.parametrize(
    "lines, extra, pattern",
    [
        (['{"prompt": "c:1=", "candidates": ["1|2"]}', '{"prompt": "c:2=", "candidates": []}'], [],
         r"cands\.jsonl:2: key 'candidates': expected a non-empty list"),
        (['{"prompt": "c:1=", "candidates": ["1|2"]}', '{"prompt": "c:2=", "candidates": ["1", ""]}'], [],
         r"cands\.jsonl:2: key 'candidates\[1\]': empty response"),
        (['{"prompt": "c:1=", "candidates": ["1|2"]}', '{"prompt": "c:2=", "candidates": ['], [],
         r"cands\.jsonl:2: malformed JSON"),
        (['{"prompt": "c:1=", "response": "1"}', '{"prompt": "c:2=", "response": "2"}',
          '{"prompt": "c:1=", "response": "3"}'], [],
         r"cands\.jsonl:3: key 'prompt': the prompt of line 1 again after other prompts.*\(mixed prompts\)$"),
        (['{"prompt": "c:1=", "response": "1"}', '{"prompt": "c:1=", "candidates": ["2"]}'], [],
         r"cands\.jsonl:2: key 'candidates': a line with 'candidates', but line 1 has 'response'"),
        (['{"prompt": "c:1=", "candidates": ["1|2"]}'], ["--steps", "re:("],
         r"--steps 're:\(': not a regular expression"),
        (['{"prompt": "c:1=", "candidates": ["1|2", "3"]}'], ["--aggregate", "vote", "--answer-regex", "z"],
         r"cands\.jsonl:1: --answer-regex 'z' finds no answer in any of the 2 candidates$"),
        (['{"prompt": "c:1=", "candidates": ["1|2", "3"]}'], ["--steps", "re:z"],
         r"cands\.jsonl: --steps 're:z' matches nothing inside any of the 2 responses"),
    ],
    ids=["empty_list", "empty_candidate", "bad_json", "mixed_prompts", "mixed_forms", "bad_regex",
         "answer_regex_nothing", "steps_regex_nothing"],
)  # fmt: skip
def test_rerank_bad_input_is_one_line(tmp_path, model_dir, ref_dir, capsys, lines, extra, pattern):
    f = tmp_path / "cands.jsonl"
    f.write_text("\n".join(lines) + "\n")
    argv = ["rerank", "--policy", str(model_dir), "--reference", str(ref_dir), "--candidates", str(f),
            "--beta", "0.1", "--out", str(tmp_path / "o.jsonl"), *extra]  # fmt: skip
    rc, err = run(argv, capsys)
    assert rc == 1
    assert_one_error(rc, err, r"^dpoq rerank: error: .*" + pattern)
