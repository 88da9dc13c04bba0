"""Decoding tests on a tabular toy model, against float64 brute-force enumeration of all responses."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpoq_jax.decode.beam import BeamConfig, beam_search
from dpoq_jax.decode.core import full_rows, pack_prompts, score_rows
from dpoq_jax.decode.guided import reward_guided_search
from dpoq_jax.decode.sampling import SampleConfig, filter_logits, generate
from dpoq_jax.decode.toy import TabularLM

V, EOS, PAD, R = 4, 2, 0, 3
PROMPTS = [[1], [1, 3, 3], [3, 1]]  # different lengths in one batch


@pytest.fixture(scope="module")
def policy() -> TabularLM:
    return TabularLM.random(V, seed=0)


@pytest.fixture(scope="module")
def reference() -> TabularLM:
    return TabularLM.random(V, seed=1)


def np_logps(model: TabularLM, prompt: list[int], response: list[int]) -> np.ndarray:
    """float64 log π(response_t | prompt, response_<t) from the table (context starts at (0, 0))."""
    table = np.asarray(model.table[...], np.float64)
    seq = [0, 0] + list(prompt) + list(response)
    out = []
    for i in range(len(response)):
        j = 2 + len(prompt) + i  # index of response token i in seq
        row = table[seq[j - 2], seq[j - 1]]
        row = row - row.max()
        out.append(row[seq[j]] - np.log(np.exp(row).sum()))
    return np.array(out)


def all_responses(max_len: int) -> list[list[int]]:
    """Every complete response: ends with EOS, or has max_len tokens without EOS (truncated)."""
    out = []
    for n in range(1, max_len + 1):
        for body in itertools.product([v for v in range(V) if v != EOS], repeat=n - 1):
            out.append(list(body) + [EOS])
    out += [list(s) for s in itertools.product([v for v in range(V) if v != EOS], repeat=max_len)]
    return out


def brute_force(model, prompt, alpha=0.0):
    """All responses sorted by (length-penalised) log-likelihood, best first."""
    scored = []
    for resp in all_responses(R):
        s = np_logps(model, prompt, resp).sum()
        scored.append((s / len(resp) ** alpha if alpha else s, s, resp))
    return sorted(scored, key=lambda x: -x[0])


def strip(tokens, mask):
    return [int(t) for t, m in zip(tokens, mask, strict=True) if m > 0]


def test_beam_with_enough_beams_is_exhaustive(policy, reference):
    # 13 live prefixes at most before the last step, so 16 beams keep everything: exact top-16.
    beta = 0.5
    gen = beam_search(
        policy,
        PROMPTS,
        BeamConfig(num_beams=16, max_new_tokens=R, eos_id=EOS, pad_id=PAD),
        ref_model=reference,
        beta=beta,
    )
    assert gen.tokens.shape == (3, 16, R)
    for b, prompt in enumerate(PROMPTS):
        exact = brute_force(policy, prompt)[:16]
        got = [strip(gen.tokens[b, k], gen.mask[b, k]) for k in range(16)]
        assert got == [e[2] for e in exact]
        np.testing.assert_allclose(gen.score[b], [e[1] for e in exact], rtol=1e-5, atol=1e-5)
        for k, resp in enumerate(got):
            lp = np_logps(policy, prompt, resp)
            ref_lp = np_logps(reference, prompt, resp)
            np.testing.assert_allclose(gen.logps[b, k, : len(resp)], lp, atol=1e-5)
            np.testing.assert_allclose(gen.reward_sum[b, k], beta * (lp - ref_lp).sum(), atol=1e-5)
            assert np.all(gen.logps[b, k, len(resp) :] == 0) and np.all(gen.tokens[b, k, len(resp) :] == PAD)
    assert gen.valid.all()


def test_beam_length_penalty_final_ranking(policy):
    # 40 beams hold all 40 complete responses; early on fewer exist, so some beams are invalid.
    cfg = BeamConfig(num_beams=40, max_new_tokens=R, eos_id=EOS, pad_id=PAD, length_penalty=1.0)
    gen = beam_search(policy, PROMPTS[:1], cfg)
    exact = brute_force(policy, PROMPTS[0], alpha=1.0)
    assert gen.valid.all()
    assert [strip(t, m) for t, m in zip(gen.tokens[0], gen.mask[0], strict=True)] == [e[2] for e in exact]
    np.testing.assert_allclose(gen.score[0], [e[0] for e in exact], atol=1e-5)


def test_beam_one_equals_greedy(policy):
    beam = beam_search(policy, PROMPTS, BeamConfig(num_beams=1, max_new_tokens=5, eos_id=EOS, pad_id=PAD))
    greedy = generate(
        policy, PROMPTS, SampleConfig(max_new_tokens=5, temperature=0.0, eos_id=EOS, pad_id=PAD)
    )
    np.testing.assert_array_equal(beam.tokens[:, 0], greedy.tokens)
    np.testing.assert_array_equal(beam.mask[:, 0], greedy.mask)
    np.testing.assert_allclose(beam.logps[:, 0], greedy.logps, atol=1e-6)
    # greedy against the table, step by step
    table = np.asarray(policy.table[...])
    for b, prompt in enumerate(PROMPTS):
        seq, want = [0, 0] + prompt, []
        while len(want) < 5 and (not want or want[-1] != EOS):
            want.append(int(np.argmax(table[seq[-2], seq[-1]])))
            seq.append(want[-1])
        assert strip(greedy.tokens[b], greedy.mask[b]) == want


def test_reward_guided_search_equals_likelihood_search(policy, reference):
    beta = 0.25
    cfg = BeamConfig(num_beams=3, max_new_tokens=4, eos_id=EOS, pad_id=PAD)
    guided = reward_guided_search(policy, reference, PROMPTS, cfg, beta=beta)
    plain = beam_search(policy, PROMPTS, cfg, ref_model=reference, beta=beta)
    np.testing.assert_array_equal(guided.tokens, plain.tokens)
    np.testing.assert_array_equal(guided.mask, plain.mask)
    np.testing.assert_allclose(guided.score, beta * plain.score, rtol=1e-5)
    # rewards tracked live with the reference cache == reference scoring of the final beams afterwards
    np.testing.assert_allclose(guided.ref_logps, plain.ref_logps, atol=1e-5)
    np.testing.assert_allclose(guided.rewards, plain.rewards, atol=1e-5)
    np.testing.assert_allclose(guided.score, (guided.rewards + beta * guided.ref_logps).sum(-1), atol=1e-5)


def test_cached_sampling_equals_uncached_scoring(policy, reference):
    cfg = SampleConfig(max_new_tokens=6, temperature=1.0, eos_id=EOS, pad_id=PAD)
    gen = generate(policy, PROMPTS * 4, cfg, seed=3, ref_model=reference, beta=0.1)
    prompts = pack_prompts(PROMPTS * 4)
    rows = full_rows(prompts, gen.tokens, PAD)
    lp, _ = score_rows(policy, rows)
    for n in range(rows.shape[0]):
        L, resp = prompts.lens_B[n], strip(gen.tokens[n], gen.mask[n])
        np.testing.assert_allclose(gen.logps[n, : len(resp)], lp[n, L : L + len(resp)], atol=1e-5)
        np.testing.assert_allclose(
            gen.logps[n, : len(resp)], np_logps(policy, PROMPTS[n % 3], resp), atol=1e-5
        )
        ref = np_logps(reference, PROMPTS[n % 3], resp)
        np.testing.assert_allclose(
            gen.rewards[n, : len(resp)], 0.1 * (gen.logps[n, : len(resp)] - ref), atol=1e-5
        )
        # EOS ends a row (or max length); nothing after it
        assert resp[-1] == EOS or len(resp) == 6
        assert EOS not in resp[:-1]
        assert np.all(gen.mask[n, len(resp) :] == 0) and np.all(gen.logps[n, len(resp) :] == 0)


def test_sampling_matches_filtered_distribution(policy):
    # First response token of many copies of one prompt: empirical frequencies vs the filtered softmax.
    n = 4000
    cfg = SampleConfig(max_new_tokens=1, temperature=0.7, top_k=3, top_p=0.9, eos_id=EOS, pad_id=PAD)
    gen = generate(policy, [[1, 3]] * n, cfg, seed=0)
    logits = np.asarray(policy.table[...], np.float64)[1, 3]
    want = np.exp(np.asarray(filter_logits(logits[None], 0.7, 3, 0.9))[0].astype(np.float64))
    want /= want.sum()
    freq = np.bincount(gen.tokens[:, 0], minlength=V) / n
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / n))


def test_filter_logits_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 11)).astype(np.float32)
    for k, p in [(0, 1.0), (4, 1.0), (0, 0.6), (5, 0.5), (0, 1e-6)]:
        got = np.asarray(filter_logits(x, 1.3, k, p))
        for b in range(5):
            z = x[b].astype(np.float64) / 1.3
            order = np.argsort(-z)
            keep = np.ones(11, bool)
            if k:
                keep[order[k:]] = False
            if p < 1:
                pr = np.where(keep, np.exp(z - z.max()), 0.0)  # top-p acts after top-k
                pr /= pr.sum()
                before = np.cumsum(pr[order]) - pr[order]
                keep[order[before >= p]] = False  # keep while the mass before a token < p
            np.testing.assert_array_equal(np.isfinite(got[b]), keep)
            np.testing.assert_allclose(got[b][keep], z[keep], rtol=1e-6)


def test_bad_inputs(policy, reference):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(policy, [[1], []], SampleConfig(max_new_tokens=2))
    with pytest.raises(ValueError, match=r"prompt 1 has token ids \[7\] outside the vocabulary of size 4"):
        beam_search(policy, [[1], [1, 7]], BeamConfig(num_beams=2, max_new_tokens=2))
    with pytest.raises(ValueError, match="top_p"):
        SampleConfig(top_p=0.0)
    with pytest.raises(ValueError, match="vocabularies differ"):
        beam_search(policy, [[1]], BeamConfig(num_beams=2, max_new_tokens=2), ref_model=TabularLM.random(5))
    with pytest.raises(ValueError, match="beta"):
        reward_guided_search(policy, reference, [[1]], BeamConfig(num_beams=2, max_new_tokens=2), beta=0.0)
