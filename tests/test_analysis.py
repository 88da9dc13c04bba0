"""Credit assignment: per-token scores vs float64 tables, metrics vs brute force, JSON/HTML/PNG reports."""

from __future__ import annotations

import html.parser
import itertools
import re

import numpy as np
import pytest

from dpoq_jax.analysis import report as rep
from dpoq_jax.analysis.credit import edit_span, score_edit, score_responses, token_scores_from_logits
from dpoq_jax.analysis.stats import auroc, credit_assignment_score, top1_hit
from dpoq_jax.decode.toy import TabularLM

V = 6


@pytest.fixture(scope="module")
def models():
    return TabularLM.random(V, seed=0), TabularLM.random(V, seed=1)


def np_values(model, prompt, response, beta):
    """float64 logps, Q = β·logit, V = β·logsumexp for each response token from the table."""
    table = np.asarray(model.table[...], np.float64)
    seq = [0, 0] + list(prompt) + list(response)
    lp, q, v = [], [], []
    for i in range(len(response)):
        j = 2 + len(prompt) + i
        row = table[seq[j - 2], seq[j - 1]]
        lse = np.log(np.exp(row - row.max()).sum()) + row.max()
        lp.append(row[seq[j]] - lse)
        q.append(beta * row[seq[j]])
        v.append(beta * lse)
    return np.array(lp), np.array(q), np.array(v)


def test_score_responses_against_table(models):
    pol, ref = models
    beta = 0.3
    prompts = [[1, 2], [3], [4, 4, 5]]
    responses = [[5, 1, 2], [0], [3, 3, 3, 3, 2]]
    out = score_responses(pol, ref, prompts, responses, beta, with_qv=True, batch_size=2)  # 2 chunks, padded
    for p, r, s in zip(prompts, responses, out, strict=True):
        lp, q, v = np_values(pol, p, r, beta)
        rlp, _, _ = np_values(ref, p, r, beta)
        np.testing.assert_allclose(s.logps, lp, atol=1e-5)
        np.testing.assert_allclose(s.rewards, beta * (lp - rlp), atol=1e-5)
        np.testing.assert_allclose(s.q, q, atol=1e-5)
        np.testing.assert_allclose(s.v, v, atol=1e-5)
        np.testing.assert_allclose(s.q - s.v, beta * s.logps, atol=1e-5)  # Q − V = β log π
        assert s.ids == r
    # the logits-level function gives the same values
    tbl = np.asarray(pol.table[...])
    rtbl = np.asarray(ref.table[...])
    seq = [0, 0] + prompts[2] + responses[2]
    idx = range(2 + len(prompts[2]), len(seq))
    lg = np.stack([tbl[seq[j - 2], seq[j - 1]] for j in idx])
    rlg = np.stack([rtbl[seq[j - 2], seq[j - 1]] for j in idx])
    s2 = token_scores_from_logits(lg, rlg, responses[2], beta, with_qv=True)
    np.testing.assert_allclose(s2.rewards, out[2].rewards, atol=1e-5)
    np.testing.assert_allclose(s2.v, out[2].v, atol=1e-5)


def test_edit_span_and_score_edit(models):
    pol, ref = models
    assert edit_span([1, 2, 3, 4], 1, 3, [5]) == [1, 5, 4]
    assert edit_span([1, 2], 2, 2, [0, 0]) == [1, 2, 0, 0]
    with pytest.raises(ValueError, match="start"):
        edit_span([1, 2], 2, 1, [])
    out = score_edit(pol, ref, [1], [2, 3, 4, 5], 1, 2, [0], beta=0.5)
    assert out["edited"].ids == [2, 0, 4, 5] and out["span"] == (1, 2)
    # tokens before the edit are scored identically; the edited one is not
    np.testing.assert_allclose(out["edited"].rewards[:1], out["original"].rewards[:1], atol=1e-6)
    assert out["edited"].rewards[1] != out["original"].rewards[1]


def test_score_errors(models):
    pol, ref = models
    with pytest.raises(ValueError, match="pairs.jsonl line 2: empty response"):
        score_responses(
            pol, ref, [[1], [1]], [[2], []], 0.1, names=["pairs.jsonl line 1", "pairs.jsonl line 2"]
        )
    with pytest.raises(ValueError, match=r"response 0: token \(index, id\) \[\(1, 9\)\] outside"):
        score_responses(pol, ref, [[1]], [[2, 9]], 0.1)
    with pytest.raises(ValueError, match="vocabularies differ"):
        score_responses(pol, TabularLM.random(V + 1), [[1]], [[2]], 0.1)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        score_responses(pol, ref, [[]], [[2]], 0.1)


def brute_auroc(s, y):
    pos = [a for a, b in zip(s, y, strict=True) if b]
    neg = [a for a, b in zip(s, y, strict=True) if not b]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)) / (
        len(pos) * len(neg)
    )


def test_auroc_against_pair_count():
    rng = np.random.default_rng(0)
    for n in (2, 5, 17, 40):
        s = rng.integers(0, 4, n).astype(float)  # many ties
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        assert auroc(s, y) == pytest.approx(brute_auroc(s, y), abs=1e-12)
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0 and auroc([1, 2, 3], [1, 0, 0]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 2], [0, 0])


def test_credit_assignment_score():
    rewards = [[0.1, -2.0, 0.3], [-1.0, -1.0, 0.5, 0.2], [0.0, 0.4, -0.3]]
    errors = [[1], [0], [1]]
    assert top1_hit(rewards[0], errors[0]) == 1.0
    assert top1_hit(rewards[1], errors[1]) == 0.5  # two tied minima, one injected
    assert top1_hit(rewards[2], errors[2]) == 0.0
    out = credit_assignment_score(rewards, errors)
    assert out["top1"] == pytest.approx(0.5) and out["n_responses"] == 3
    s = -np.concatenate([np.asarray(r) for r in rewards])
    y = np.zeros(len(s), bool)
    y[[1, 3, 8]] = True
    assert out["auroc_pooled"] == pytest.approx(brute_auroc(s, y))
    per = [
        brute_auroc(-np.asarray(r), np.isin(np.arange(len(r)), e))
        for r, e in zip(rewards, errors, strict=True)
    ]
    assert out["auroc_mean_per_response"] == pytest.approx(np.mean(per))
    with pytest.raises(ValueError, match="response 0: top1_hit: error positions"):
        credit_assignment_score([[0.1]], [[3]])


class _Checker(html.parser.HTMLParser):
    """Checks nesting of tags and collects the text of token spans."""

    VOID = {"meta", "br", "img", "link", "hr", "input"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack, self.tokens, self.titles, self._in_tok = [], [], [], False

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        self.stack.append(tag)
        a = dict(attrs)
        if tag == "span" and "tok" in a.get("class", "").split():
            self._in_tok = True
            self.tokens.append("")
            self.titles.append(a["title"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>, open: {self.stack}"
        self.stack.pop()
        self._in_tok = False

    def handle_data(self, data):
        if self._in_tok:
            self.tokens[-1] += data


def _report(models):
    pol, ref = models
    prompts, chosen, rejected = [[1], [2, 3]], [[3, 4, 2], [5, 2]], [[3, 0, 2], [1, 1, 1, 2]]
    toks = {0: "<a&b>", 1: '"q"', 2: "<eos>", 3: "x", 4: " y", 5: "\n"}  # characters HTML must escape
    sc = score_responses(pol, ref, prompts + prompts, chosen + rejected, 0.1, with_qv=True)
    items = [
        rep.make_item(
            f"prompt <{i}>",
            {
                "chosen": (sc[i], [toks[t] for t in chosen[i]]),
                "rejected": (sc[2 + i], [toks[t] for t in rejected[i]]),
            },
            {"index": i, "error_positions": [1]},
        )
        for i in range(2)
    ]
    return {"beta": 0.1, "items": items}


def test_json_round_trip(models, tmp_path):
    report = _report(models)
    rep.save_json(report, tmp_path / "r.json")
    assert rep.load_json(tmp_path / "r.json") == report
    (tmp_path / "bad.json").write_text(
        '{"items": [{"responses": {"chosen": {"ids": [1], "tokens": ["a"]}}}]}'
    )
    with pytest.raises(ValueError, match=r"bad.json: items\[0\].responses.chosen has no key 'rewards'"):
        rep.load_json(tmp_path / "bad.json")


def test_html_every_token_once_and_well_formed(models, tmp_path):
    report = _report(models)
    rep.write_html(report, tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text()
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.stack == []
    want = [t for it in report["items"] for r in it["responses"].values() for t in r["tokens"]]
    assert p.tokens == want
    assert "<a&b>" not in text and "&lt;a&amp;b&gt;" in text
    first = report["items"][0]["responses"]["chosen"]
    assert f"reward {first['rewards'][0]:+.4f}" in p.titles[0] and "Q " in p.titles[0]
    n_chosen = len(first["tokens"])
    assert "injected error" in p.titles[n_chosen + 1] and "injected error" not in p.titles[1]


def test_png_size(models, tmp_path):
    report = _report(models)
    w, h = rep.write_png(report["items"][1], tmp_path / "r.png")
    assert rep.png_shape(tmp_path / "r.png") == (w, h) == (110 + 44 * 4 + 60, 56 * 2 + 70)


def test_error_injection_credit_end_to_end():
    from dpoq_jax.analysis.stats import error_injection_credit
    from dpoq_jax.data.synthetic import ErrorInjectionTask

    task = ErrorInjectionTask(seed=3)
    tok = task.tokenizer
    exs = task.preference_examples(6, "validation")
    pol, ref = TabularLM.random(tok.vocab_size, seed=2), TabularLM.random(tok.vocab_size, seed=3)
    got = error_injection_credit(pol, ref, exs, tok, beta=0.2)
    # Independent reference, from the tables in numpy: the logits for token p are table[x[p-2], x[p-1]]
    # (token -1 is 0, the empty cache); r = β (log π − log π_ref) of each rejected token (EOS appended).
    tp, tr = np.asarray(pol.table[...], np.float64), np.asarray(ref.table[...], np.float64)

    def logp(table, x, p):
        row = table[x[p - 2] if p >= 2 else 0, x[p - 1]]
        return row[x[p]] - np.log(np.exp(row - row.max()).sum()) - row.max()

    hits, pos_scores, neg_scores = [], [], []
    rejected = []
    for e in exs:
        prompt, resp = tok.encode(e.prompt), tok.encode(e.rejected) + [tok.eos_token_id]
        rejected.append(resp)
        x = prompt + resp
        r = [0.2 * (logp(tp, x, len(prompt) + i) - logp(tr, x, len(prompt) + i)) for i in range(len(resp))]
        errs = set(e.meta["error_positions"])
        hits.append(float(int(np.argmin(r)) in errs))
        pos_scores += [-r[i] for i in errs]
        neg_scores += [-r[i] for i in range(len(r)) if i not in errs]
    pairs = [(a > b) + 0.5 * (a == b) for a in pos_scores for b in neg_scores]  # Mann–Whitney by counting
    assert got["n_responses"] == 6 and got["top1"] == pytest.approx(np.mean(hits))
    assert got["auroc_pooled"] == pytest.approx(np.mean(pairs)) and got["beta"] == 0.2
    assert 0 < got["auroc_pooled"] < 1  # random tables: neither perfect nor empty, so the check can fail
    # the gold judge agrees with the injected positions the metric uses
    for e, r in zip(exs, rejected, strict=True):
        assert list(np.flatnonzero(task.gold_token_rewards(e.prompt, r) < 0)) == e.meta["error_positions"]


def test_html_outlines_errors_readable_headings_index_and_pages(models, tmp_path):
    report = _report(models)
    report["items"] = report["items"] * 30  # 60 examples: more than one page
    text = rep.render_html(report)
    # The outline class sits on exactly the injected tokens (rejected token 1 of every example).
    outlined = re.findall(r'<span class="tok err"[^>]*title="#(\d+) ', text)
    assert outlined == ["1"] * 60
    assert text.count('class="tok"') + len(outlined) == sum(
        len(r["tokens"]) for it in report["items"] for r in it["responses"].values()
    )
    # Headings are words, not JSON; the meta reads as "key: value".
    assert "<h2>Example 0</h2>" in text and '{"index"' not in text and "{&quot;" not in text
    assert "index: 0 · error positions: 1" in text
    # A compact index links every example; pages of PAGE_SIZE, the first open.
    assert len(re.findall(r'<a href="#item-\d+"', text)) == 60
    assert text.count('<details class="page"') == -(-60 // rep.PAGE_SIZE)
    assert text.count('<details class="page" open>') == 1
    # Text on a saturated background is white, on a pale one black (by luminance).
    assert rep._text_on((214, 39, 40)) == "#fff" and rep._text_on((250, 240, 240)) == "#000"
