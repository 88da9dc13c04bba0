"""dpoq_jax.tokenq against float64 numpy references: values, gradients, invariances, masking."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax import tokenq

B, T, V, D = 3, 5, 11, 6
BETA = 0.3


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.float32)
    mask[0, 3:] = 0  # right padding
    mask[2, 1:] = 0
    return logits, targets, mask


def _np_token_logps(logits, targets, mask):
    lp = _np_log_softmax(logits)
    return np.take_along_axis(lp, targets[..., None], -1)[..., 0] * mask


class TokenLogpsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_value_and_grad_match_float64(self):
        logits, targets, mask = _inputs()
        fn = self.variant(tokenq.token_logps)
        np.testing.assert_allclose(
            fn(logits, targets, mask), _np_token_logps(logits, targets, mask), atol=1e-5
        )
        # d Σ w·logp / d logits = w·(onehot − softmax) where mask is 1.
        w = np.random.default_rng(1).normal(size=(B, T))
        grad = self.variant(jax.grad(lambda x: jnp.sum(tokenq.token_logps(x, targets, mask) * w)))(logits)
        onehot = np.eye(V)[targets]
        ref = (w * mask)[..., None] * (onehot - np.exp(_np_log_softmax(logits)))
        np.testing.assert_allclose(grad, ref, atol=1e-5)

    def test_bfloat16_logits_give_float32(self):
        logits, targets, mask = _inputs()
        out = tokenq.token_logps(jnp.asarray(logits, jnp.bfloat16), targets, mask)
        assert out.dtype == jnp.float32
        ref = _np_token_logps(
            np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets, mask
        )
        np.testing.assert_allclose(out, ref, atol=1e-5)

    def test_logit_shift_invariance(self):
        logits, targets, mask = _inputs()
        shift = np.random.default_rng(2).normal(size=(B, T, 1)).astype(np.float32) * 10
        np.testing.assert_allclose(
            tokenq.token_logps(logits + shift, targets, mask),
            tokenq.token_logps(logits, targets, mask),
            atol=1e-5,
        )
        np.testing.assert_allclose(
            tokenq.advantages(logits + shift, BETA), tokenq.advantages(logits, BETA), atol=1e-5
        )

    def test_masked_positions_have_no_effect(self):
        logits, targets, mask = _inputs()
        logits2, targets2 = logits.copy(), targets.copy()
        logits2[mask == 0] = 1e3
        targets2[mask == 0] = -100  # typical ignore id: must not crash or leak
        a = tokenq.token_logps(logits, targets, mask)
        b = tokenq.token_logps(logits2, targets2, mask)
        np.testing.assert_array_equal(a, b)
        assert np.all(np.asarray(a)[mask == 0] == 0)
        g = jax.grad(lambda x: tokenq.token_logps(x, targets, mask).sum())(logits)
        assert np.all(np.asarray(g)[mask == 0] == 0)


class LeanLogpsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_lean_equals_full_value_and_grads(self):
        rng = np.random.default_rng(3)
        h = rng.normal(size=(B, T, D)).astype(np.float32)
        w = rng.normal(size=(D, V)).astype(np.float32)
        _, targets, mask = _inputs()
        coef = rng.normal(size=(B, T)).astype(np.float32)

        def full(h, w):
            return jnp.sum(coef * tokenq.token_logps(jnp.einsum("btd,dv->btv", h, w), targets, mask))

        # chunk_size 6 with B = 3: 2 steps per chunk, which does not divide T = 5 (padding path)
        def lean(h, w):
            return jnp.sum(coef * tokenq.lean_token_logps(h, w, targets, mask, chunk_size=6))

        vf, gf = jax.value_and_grad(full, argnums=(0, 1))(h, w)
        vl, gl = self.variant(jax.value_and_grad(lean, argnums=(0, 1)))(h, w)
        np.testing.assert_allclose(vl, vf, atol=1e-5, rtol=1e-5)
        for a, e in zip(gl, gf, strict=True):
            np.testing.assert_allclose(a, e, atol=1e-5, rtol=1e-5)
        # and against float64 numpy
        ref = _np_token_logps(np.einsum("btd,dv->btv", h.astype(np.float64), w), targets, mask)
        np.testing.assert_allclose(tokenq.lean_token_logps(h, w, targets, mask, chunk_size=6), ref, atol=1e-5)

    def test_lean_big_chunk(self):
        rng = np.random.default_rng(4)
        h = rng.normal(size=(B, T, D)).astype(np.float32)
        w = rng.normal(size=(D, V)).astype(np.float32)
        _, targets, mask = _inputs()
        np.testing.assert_allclose(
            tokenq.lean_token_logps(h, w, targets, mask, chunk_size=1000),
            tokenq.token_logps(h @ w, targets, mask),
            atol=1e-5,
        )

    def test_lean_bad_shapes(self):
        h = jnp.zeros((B, T, D))
        with pytest.raises(ValueError, match="unembed_DV"):
            tokenq.lean_token_logps(h, jnp.zeros((D + 1, V)), jnp.zeros((B, T), jnp.int32))


class QValueTest(chex.TestCase):
    def test_rewards_q_v_against_float64(self):
        logits, targets, mask = _inputs()
        ref_logits, _, _ = _inputs(seed=9)
        lp = _np_token_logps(logits, targets, mask)
        rlp = _np_token_logps(ref_logits, targets, mask)
        r = tokenq.implicit_rewards(lp.astype(np.float32), rlp.astype(np.float32), mask, BETA)
        np.testing.assert_allclose(r, BETA * (lp - rlp) * mask, atol=1e-5)
        np.testing.assert_allclose(tokenq.masked_sum(r, mask), (BETA * (lp - rlp) * mask).sum(-1), atol=1e-5)
        np.testing.assert_allclose(
            tokenq.implicit_q(logits, BETA), BETA * logits.astype(np.float64), atol=1e-5
        )
        m = logits.astype(np.float64).max(-1)
        v = BETA * (m + np.log(np.exp(logits - m[..., None]).sum(-1)))
        np.testing.assert_allclose(tokenq.implicit_v(logits, BETA), v, atol=1e-5)
        # A = Q − V = β log π
        np.testing.assert_allclose(tokenq.advantages(logits, BETA), BETA * _np_log_softmax(logits), atol=1e-5)

    def test_bellman_rewards_telescope(self):
        logits, targets, mask = _inputs()
        ref_logits, _, _ = _inputs(seed=9)
        rlp = _np_token_logps(ref_logits, targets, mask)
        r = np.asarray(
            tokenq.bellman_rewards(logits, targets, rlp.astype(np.float32), mask, BETA), np.float64
        )
        # float64 reference with V = 0 after the last real token.
        lg = logits.astype(np.float64)
        q = BETA * np.take_along_axis(lg, targets[..., None], -1)[..., 0]
        v = BETA * np.log(np.exp(lg).sum(-1))
        v_next = np.concatenate([v[:, 1:] * mask[:, 1:], np.zeros((B, 1))], 1)
        np.testing.assert_allclose(r, (q - BETA * rlp - v_next) * mask, atol=1e-5)
        # Σ_t r_t = Σ_t β log π/π_ref + V(s_0)
        lp = _np_token_logps(logits, targets, mask)
        np.testing.assert_allclose(r.sum(-1), (BETA * (lp - rlp)).sum(-1) + v[:, 0], atol=1e-4)
        # a per-state shift c(s) of the logits is potential shaping: r_t changes by β(c_t − c_{t+1}).
        c = np.random.default_rng(5).normal(size=(B, T, 1)).astype(np.float32)
        r2 = np.asarray(tokenq.bellman_rewards(logits + c, targets, rlp.astype(np.float32), mask, BETA))
        c_next = np.concatenate([c[:, 1:, 0] * mask[:, 1:], np.zeros((B, 1))], 1)
        np.testing.assert_allclose(r2 - r, BETA * (c[..., 0] - c_next) * mask, atol=1e-4)

    def test_expected_ref_reward_is_minus_kl(self):
        logits, _, _ = _inputs()
        ref_logits, _, _ = _inputs(seed=9)
        lp, rlp = _np_log_softmax(logits), _np_log_softmax(ref_logits)
        kl = (np.exp(rlp) * (rlp - lp)).sum(-1)
        e = np.asarray(tokenq.expected_ref_reward(logits, ref_logits, BETA))
        np.testing.assert_allclose(e, -BETA * kl, atol=1e-5)
        assert np.all(e <= 1e-7)
        np.testing.assert_allclose(tokenq.expected_ref_reward(ref_logits, ref_logits, BETA), 0.0, atol=1e-6)


def test_lean_bfloat16_matches_full_with_float32_logits():
    rng = np.random.default_rng(6)
    h = jnp.asarray(rng.normal(size=(B, T, D)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(D, V)), jnp.bfloat16)
    _, targets, mask = _inputs()
    lean = tokenq.lean_token_logps(h, w, targets, mask, chunk_size=6)
    assert lean.dtype == jnp.float32
    full = tokenq.token_logps(
        jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32), targets, mask
    )
    np.testing.assert_allclose(lean, full, atol=1e-5)
    g = jax.grad(lambda h: tokenq.lean_token_logps(h, w, targets, mask, chunk_size=6).sum())(h)
    assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_lean_under_jit_with_batch_sharded_inputs():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    rng = np.random.default_rng(7)
    h = rng.normal(size=(4, T, D)).astype(np.float32)
    w = rng.normal(size=(D, V)).astype(np.float32)
    targets = rng.integers(0, V, size=(4, T)).astype(np.int32)
    fn = jax.jit(lambda h, t: tokenq.lean_token_logps(h, w, t, chunk_size=8))
    out = fn(
        jax.device_put(h, NamedSharding(mesh, P("data"))),
        jax.device_put(targets, NamedSharding(mesh, P("data"))),
    )
    np.testing.assert_allclose(
        out, _np_token_logps(h.astype(np.float64) @ w, targets, np.ones((4, T))), atol=1e-5
    )
