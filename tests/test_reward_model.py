"""dpoq_jax/reward_model.py: the explicit token-level and outcome reward models (Bradley–Terry baselines).

A tiny random decoder stands in for the SFT model. The synthetic problem: chosen and rejected responses
are identical except that one token of the rejected one is replaced by a BAD id, so a token reward model
that localises errors gives its lowest credit to that token.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import CLI_MODEL

from dpoq_jax import reward_model as rmod
from dpoq_jax.data.examples import TokenizedPair
from dpoq_jax.models.decoder import Decoder

# the CLI tests' tiny Llama, with a 16-token vocabulary and room for the test rows
CFG = dataclasses.replace(CLI_MODEL, vocab_size=16, max_position_embeddings=32)
BAD = 13  # the id that marks a rejected response; ordinary tokens are 3..11
# Early stopping matters: trained much longer (e.g. 12-40 steps at this lr), the token model's blame
# drifts from the bad token onto later tokens (their states see it too; BT fixes only the sum).
TRAIN = dict(steps=8, lr=1e-2, batch_size=16, seed=0)


def tiny_decoder(seed: int = 0) -> Decoder:
    return Decoder(CFG, rngs=nnx.Rngs(seed), dtype=jnp.float32)


def make_pairs(n: int, seed: int) -> list[TokenizedPair]:
    """Prompts of 3 tokens, responses of 6; the rejected one has BAD at a random place among the first 5."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prompt = [int(t) for t in rng.integers(3, 12, 3)]
        chosen = [int(t) for t in rng.integers(3, 12, 6)]
        rejected = list(chosen)
        rejected[int(rng.integers(0, 5))] = BAD
        out.append(TokenizedPair(prompt, chosen, rejected))
    return out


def with_random_head(kind: str, seed: int = 0) -> rmod.RewardModel:
    rm = rmod.init_reward_model(tiny_decoder(seed), kind)
    rng = np.random.default_rng(seed)
    rm.net.head_w[...] = jnp.asarray(rng.normal(0, 1, CFG.hidden_size), jnp.float32)
    rm.net.head_b[...] = jnp.float32(0.3)
    return rm


def row_values(rm: rmod.RewardModel, ids: list[int]) -> np.ndarray:
    """The head's value at every position of one unpadded row (the network called directly)."""
    return np.asarray(rm.net(jnp.asarray([ids], jnp.int32))[0], np.float64)


@pytest.fixture(scope="module")
def data():
    return make_pairs(64, 1), make_pairs(16, 2)


@pytest.fixture(scope="module")
def token_rm(data):
    return rmod.train_reward_model(tiny_decoder(), data[0], kind="token", **TRAIN)


# ---- the losses against numpy -----------------------------------------------------------------------


def np_bt_loss(vw, mw, vl, ml, kind):
    """float64 reference: R = Σ_masked v (token) or v at the last masked position (outcome)."""

    def reward(v, m):
        if kind == "token":
            return (v * m).sum(-1)
        last = np.array([np.flatnonzero(row)[-1] for row in m])
        return v[np.arange(len(v)), last]

    margin = reward(vw, mw) - reward(vl, ml)
    return float(np.mean(np.logaddexp(0.0, -margin)))  # −log σ(x) = log(1 + e^−x)


def ragged_masks(rng, N, S):
    m = np.zeros((N, S), np.float64)
    for n in range(N):
        a = int(rng.integers(0, S - 1))
        m[n, a : int(rng.integers(a + 1, S + 1))] = 1
    return m


@pytest.mark.parametrize("scale", [1.0, 60.0])  # 60: margins far into the saturated tails
def test_bt_losses_match_numpy(scale):
    rng = np.random.default_rng(0)
    N, S = 6, 9
    vw, vl = (scale * rng.normal(size=(N, S)) for _ in range(2))
    mw, ml = ragged_masks(rng, N, S), ragged_masks(rng, N, S)
    args = [jnp.asarray(x, jnp.float32) for x in (vw, mw, vl, ml)]
    for kind, fn in (("token", rmod.token_bt_loss), ("outcome", rmod.outcome_bt_loss)):
        want = np_bt_loss(vw, mw, vl, ml, kind)
        got = float(fn(*args))
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5), kind
        assert float(jax.jit(rmod.bt_loss, static_argnums=4)(*args, kind)) == pytest.approx(got, rel=1e-6)
        assert fn(*args).dtype == jnp.float32
        g = jax.grad(fn)(*args)
        assert np.isfinite(np.asarray(g)).all()
        # values at masked-out positions (prompt, padding) change nothing, even huge ones
        noisy_w = np.where(mw > 0, vw, 1e6 * rng.normal(size=(N, S)))
        moved = float(fn(jnp.asarray(noisy_w, jnp.float32), *args[1:]))
        assert moved == pytest.approx(got, rel=1e-6), kind


def test_zero_head_gives_zero_rewards_and_log2():
    pairs = make_pairs(5, 3)
    prompts, rejected = [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs]
    for kind in rmod.KINDS:
        rm = rmod.init_reward_model(tiny_decoder(), kind)
        assert not rm.trained
        np.testing.assert_array_equal(rmod.sequence_rewards(rm, prompts, rejected), 0.0)
        for c in rmod.token_credit(rm, prompts, rejected):
            np.testing.assert_array_equal(c, 0.0)
        tokens = jnp.asarray([p.prompt_ids + p.chosen_ids for p in pairs], jnp.int32)
        mask = jnp.asarray([[0] * 3 + [1] * 6] * len(pairs), jnp.float32)
        values = rm.net(tokens)
        assert float(rmod.bt_loss(values, mask, values, mask, kind)) == pytest.approx(math.log(2), abs=1e-7)


# ---- alignment, sums and masking --------------------------------------------------------------------


def test_credit_alignment_and_sums():
    rng = np.random.default_rng(4)
    prompts = [[int(t) for t in rng.integers(3, 12, n)] for n in (2, 5, 1, 4)]
    responses = [[int(t) for t in rng.integers(3, 12, n)] for n in (6, 1, 3, 9)]
    tok, out = with_random_head("token"), with_random_head("outcome")
    r_tok, c_tok = rmod.sequence_rewards(tok, prompts, responses), rmod.token_credit(tok, prompts, responses)
    r_out, c_out = rmod.sequence_rewards(out, prompts, responses), rmod.token_credit(out, prompts, responses)
    for i, (p, y) in enumerate(zip(prompts, responses, strict=True)):
        full = row_values(tok, p + y)  # same network and head for both kinds
        assert c_tok[i].dtype == np.float64 and len(c_tok[i]) == len(c_out[i]) == len(y)
        # r_t is the head at the position of response token t itself
        np.testing.assert_allclose(c_tok[i], full[len(p) :], rtol=1e-5, atol=1e-6)
        assert c_tok[i].sum() == pytest.approx(r_tok[i], rel=1e-9)
        # outcome: R = head at the last response token; credits telescope to o(y) − o(prompt),
        # o(prompt) from a row holding the prompt alone (causality: the same number)
        assert r_out[i] == pytest.approx(full[-1], rel=1e-5, abs=1e-6)
        o_prompt = row_values(out, p)[-1]
        assert c_out[i].sum() == pytest.approx(r_out[i] - o_prompt, rel=1e-5, abs=1e-5)
        np.testing.assert_allclose(c_out[i], np.diff(full[len(p) - 1 :]), rtol=1e-5, atol=1e-5)


def test_padding_and_prompt_are_masked():
    rm = with_random_head("token", seed=1)
    prompts, responses = [[3, 4, 5], [6, 7]], [[8, 9], [10, 11, 3]]
    alone = rmod.token_credit(rm, prompts, responses)
    # a much longer row in the batch (more padding on these), another pad id, one row per call
    longer = rmod.token_credit(rm, prompts + [[3] * 4], responses + [[4] * 20], pad_id=7)
    single = rmod.token_credit(rm, prompts[:1], responses[:1], pad_id=15, batch_size=1)
    for a, b in zip(alone, longer[:2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone[0], single[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(rmod.token_credit(rm, prompts, responses, pad_id=9)[1], alone[1])
    # the prompt's head values are there (not zero) but do not enter R
    R = rmod.sequence_rewards(rm, prompts, responses)
    for i, (p, y) in enumerate(zip(prompts, responses, strict=True)):
        full = row_values(rm, p + y)
        assert abs(full[: len(p)].sum()) > 1e-2
        assert R[i] == pytest.approx(full[len(p) :].sum(), rel=1e-5, abs=1e-6)
        assert abs(R[i] - full.sum()) > 1e-3


# ---- training ---------------------------------------------------------------------------------------


def top1(rm, pairs) -> float:
    credits = rmod.token_credit(rm, [p.prompt_ids for p in pairs], [p.rejected_ids for p in pairs])
    hits = [np.argmin(c) == p.rejected_ids.index(BAD) for c, p in zip(credits, pairs, strict=True)]
    return float(np.mean(hits))


def test_token_model_learns_and_localises_the_bad_token(token_rm, data):
    train, held = data
    assert token_rm.trained and len(token_rm.losses) == TRAIN["steps"]
    assert token_rm.losses[0] == pytest.approx(math.log(2), abs=1e-6)  # the zero head's first batch
    assert token_rm.losses[-3:].mean() < 0.3
    assert top1(token_rm, held) >= 0.8
    prompts = [p.prompt_ids for p in held]
    chosen = rmod.sequence_rewards(token_rm, prompts, [p.chosen_ids for p in held])
    rejected = rmod.sequence_rewards(token_rm, prompts, [p.rejected_ids for p in held])
    assert np.mean(chosen > rejected) >= 0.9


def test_outcome_model_learns(data):
    dec = tiny_decoder()
    before = nnx.to_pure_dict(nnx.state(dec, nnx.Param))
    rm = rmod.train_reward_model(dec, data[0], kind="outcome", **TRAIN)
    assert rm.kind == "outcome" and rm.losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert rm.losses[-3:].mean() < 0.5
    held = data[1]
    prompts = [p.prompt_ids for p in held]
    chosen = rmod.sequence_rewards(rm, prompts, [p.chosen_ids for p in held])
    rejected = rmod.sequence_rewards(rm, prompts, [p.rejected_ids for p in held])
    assert np.mean(chosen > rejected) >= 0.75
    after = nnx.to_pure_dict(nnx.state(dec, nnx.Param))  # the Decoder given as init is not modified
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_same_seed_same_numbers_and_cache_round_trip(token_rm, data, tmp_path):
    train, held = data
    prompts, rejected = [p.prompt_ids for p in held], [p.rejected_ids for p in held]
    want = rmod.token_credit(token_rm, prompts, rejected)

    def same(rm):
        for a, b in zip(want, rmod.token_credit(rm, prompts, rejected), strict=True):
            np.testing.assert_array_equal(a, b)

    again = rmod.train_reward_model(tiny_decoder(), train, kind="token", cache_dir=tmp_path, **TRAIN)
    assert again.trained
    same(again)
    np.testing.assert_array_equal(again.losses, token_rm.losses)
    assert len(list(tmp_path.glob("*.npz"))) == 1 and len(list(tmp_path.glob("*.json"))) == 1
    assert not list(tmp_path.glob("*.tmp"))

    loaded = rmod.train_reward_model(tiny_decoder(), train, kind="token", cache_dir=tmp_path, **TRAIN)
    assert not loaded.trained  # read from the cache, no step run
    same(loaded)
    np.testing.assert_array_equal(loaded.losses, token_rm.losses)

    # other settings (seed), other pairs, other initial weights: trained again, each its own file
    seed1 = {**TRAIN, "seed": 1}
    other = rmod.train_reward_model(tiny_decoder(), train, kind="token", cache_dir=tmp_path, **seed1)
    assert other.trained
    assert not np.array_equal(rmod.token_credit(other, prompts, rejected)[0], want[0])
    fewer = rmod.train_reward_model(tiny_decoder(), train[:-1], kind="token", cache_dir=tmp_path, **TRAIN)
    assert fewer.trained
    init1 = rmod.train_reward_model(tiny_decoder(1), train, kind="token", cache_dir=tmp_path, **TRAIN)
    assert init1.trained
    assert len(list(tmp_path.glob("*.npz"))) == 4


def test_init_from_a_model_folder(tmp_path):
    """`init` may be a model folder (load_model); helpers.save_tiny_model writes a Hugging Face one."""
    from helpers import CLI_MODEL, save_tiny_model

    rm = rmod.init_reward_model(save_tiny_model(tmp_path, seed=0), "outcome")
    assert rm.net.decoder.cfg.hidden_size == CLI_MODEL.hidden_size
    np.testing.assert_array_equal(rmod.sequence_rewards(rm, [[5, 6]], [[7, 8, 9]]), 0.0)


def test_clear_errors(data):
    train = data[0]
    with pytest.raises(ValueError, match="kind must be one of"):
        rmod.train_reward_model(tiny_decoder(), train, kind="sequence", **TRAIN)
    with pytest.raises(ValueError, match="pairs is empty"):
        rmod.train_reward_model(tiny_decoder(), [], kind="token", **TRAIN)
    with pytest.raises(ValueError, match="kind"):
        rmod.init_reward_model(tiny_decoder(), "Token")
    with pytest.raises(ValueError, match="kind"):
        rmod.bt_loss(jnp.zeros((1, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2)), jnp.ones((1, 2)), "pairwise")
    bad = [TokenizedPair([3], [4], [CFG.vocab_size + 1])]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rmod.train_reward_model(tiny_decoder(), bad, kind="token", **TRAIN)
