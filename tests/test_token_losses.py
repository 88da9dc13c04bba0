"""Token-level preference losses (tdpo, token_weighted, selective), the chunked per-token KL, TIS-DPO's
weights and SePO's token selection, against float64 numpy formulas; gradients by float64 finite
differences; jit and no-jit."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import central_difference

from dpoq_jax import losses, tokenq
from dpoq_jax.losses import LossConfig

B, T = 6, 7


def _ls(z):
    return -np.logaddexp(0.0, -z)


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def _batch(seed=0):
    """Per-token policy/reference log-probs (0 where padded, as token_logps gives), masks with lengths
    1..T, two dummy pairs, and the three token-level inputs with garbage at padded tokens."""
    rng = np.random.default_rng(seed)
    lp = lambda: np.log(rng.uniform(0.05, 0.95, size=(B, T))).astype(np.float32)  # noqa: E731
    pc, pr, rc, rr = lp(), lp(), lp(), lp()
    cm = (np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))).astype(np.float32)
    rm = (np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))).astype(np.float32)
    cm[0], rm[0] = 1, 0
    rm[0, :3] = 1  # one pair of lengths 7 and 3 for sure
    pc, pr, rc, rr = pc * cm, pr * rm, rc * cm, rr * rm
    pm = np.ones(B, np.float32)
    pm[-2:] = 0
    garbage = lambda m, x: np.where(m > 0, x, np.inf).astype(np.float32)  # noqa: E731
    kc = garbage(cm, rng.uniform(0.0, 0.5, size=(B, T)))
    kr = garbage(rm, rng.uniform(0.0, 0.5, size=(B, T)))
    wc = garbage(cm, rng.uniform(0.2, 2.0, size=(B, T)))
    wr = garbage(rm, rng.uniform(0.2, 2.0, size=(B, T)))
    oc = garbage(cm, rng.normal(size=(B, T)))
    orr = garbage(rm, rng.normal(size=(B, T)))
    return dict(pc=pc, pr=pr, rc=rc, rr=rr, cm=cm, rm=rm, pm=pm, kc=kc, kr=kr, wc=wc, wr=wr, oc=oc, orr=orr)


def _mean(x, pm):
    return (x * pm).sum() / pm.sum()


def _np_tdpo(pc, pr, rc, rr, cm, rm, kc, kr, pm, beta, variant, alpha):
    """TDPO1: −log σ(β[(u_w − u_l) − (D_l − D_w)]); TDPO2: −log σ(β[(u_w − u_l) − α(D_l − D_w)]) (the
    value; TDPO2's stop-gradient on D_w only changes the gradient). u = Σ log π/π_ref, D = Σ_t KL."""
    pc, pr, rc, rr, cm, rm, kc, kr, pm = _f64(pc, pr, rc, rr, cm, rm, kc, kr, pm)
    uc, ur = ((pc - rc) * cm).sum(1), ((pr - rr) * rm).sum(1)
    dc, dr = np.where(cm > 0, kc, 0).sum(1), np.where(rm > 0, kr, 0).sum(1)
    a = 1.0 if variant == 1 else alpha
    z = beta * ((uc - ur) - a * (dr - dc))
    extra = {
        "tdpo/seq_kl_chosen": _mean(dc, pm),
        "tdpo/seq_kl_rejected": _mean(dr, pm),
        "tdpo/rewards_chosen": _mean(beta * (uc + dc), pm),
        "tdpo/rewards_rejected": _mean(beta * (ur + dr), pm),
        "rewards/chosen": _mean(beta * uc, pm),
        "rewards/margins": _mean(beta * (uc - ur), pm),
    }
    return _mean(-_ls(z), pm), extra


def _np_token_weighted(pc, pr, rc, rr, cm, rm, wc, wr, pm, beta):
    """−log σ(β[Σ_t w_t log π/π_ref (chosen) − Σ_t w_t log π/π_ref (rejected)])."""
    pc, pr, rc, rr, cm, rm, wc, wr, pm = _f64(pc, pr, rc, rr, cm, rm, wc, wr, pm)
    wc, wr = np.where(cm > 0, wc, 0), np.where(rm > 0, wr, 0)
    tc, tr = (wc * (pc - rc)).sum(1), (wr * (pr - rr)).sum(1)
    real_c, real_r = (cm * pm[:, None]) > 0, (rm * pm[:, None]) > 0
    extra = {
        "token_weighted/rewards_chosen": _mean(beta * tc, pm),
        "token_weighted/rewards_rejected": _mean(beta * tr, pm),
        "token_weighted/weight_chosen": wc[real_c].mean(),
        "token_weighted/weight_rejected": wr[real_r].mean(),
    }
    return _mean(-_ls(beta * (tc - tr)), pm), extra


def _np_select(r, m, ratio, top):
    """Hand-written rule: per row, among real tokens, k = max(1, floor(ratio·n + 1e-9)) (0 if n = 0)
    with the highest (top) / lowest reward, ties to the earlier position."""
    r, m = np.asarray(r, np.float64), np.asarray(m)
    out = np.zeros(r.shape)
    for b in range(r.shape[0]):
        idx = [t for t in range(r.shape[1]) if m[b, t] > 0]
        k = 0 if not idx else max(1, math.floor(ratio * len(idx) + 1e-9))
        idx.sort(key=lambda t, b=b: ((-r[b, t] if top else r[b, t]), t))
        out[b, idx[:k]] = 1
    return out


def _np_selective(pc, pr, cm, rm, oc, orr, pm, beta, gamma, ratio):
    """SePO: −log σ(β(mean log π over the chosen's top tokens − over the rejected's bottom tokens) − γ)."""
    pc, pr, pm = _f64(pc, pr, pm)
    sc, sr = _np_select(oc, cm, ratio, True), _np_select(orr, rm, ratio, False)
    ac, ar = (pc * sc).sum(1) / sc.sum(1), (pr * sr).sum(1) / sr.sum(1)
    extra = {"selective/logps_mean_chosen": _mean(ac, pm), "selective/logps_mean_rejected": _mean(ar, pm)}
    return _mean(-_ls(beta * (ac - ar) - gamma), pm), extra


def _np_kl(logits_p, logits_r):
    lp = logits_p - np.logaddexp.reduce(logits_p, axis=-1, keepdims=True)
    lr = logits_r - np.logaddexp.reduce(logits_r, axis=-1, keepdims=True)
    return (np.exp(lr) * (lr - lp)).sum(-1)


def _fd(f_np, args, i, h=1e-6):
    """Central differences of the float64 formula f_np w.r.t. args[i]."""
    return central_difference(f_np, args, i, h)


def _check_grads(f_jax, f_np, args, which, atol=1e-9):
    """Float64 jax gradient of f_jax w.r.t. args[i] for i in `which` vs central differences of f_np."""
    with jax.enable_x64(True):
        a64 = [np.asarray(x, np.float64) for x in args]
        assert f_jax(*a64).dtype == np.float64
        g = jax.grad(f_jax, argnums=which)(*a64)
    for gi, i in zip(g, which, strict=True):
        num = _fd(f_np, args, i)
        np.testing.assert_allclose(np.asarray(gi), num, atol=atol, rtol=1e-6)
        assert np.abs(num).max() > 1e-4  # the check is not vacuous


class TokenLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_tdpo_both_variants_match_float64(self):
        d = _batch(0)
        for variant, alpha, beta in ((1, 0.5, 0.3), (2, 0.5, 0.3), (2, 1.7, 0.1)):
            cfg = LossConfig(beta=beta, loss_type="tdpo", tdpo_variant=variant, tdpo_alpha=alpha)
            fn = self.variant(functools.partial(losses.preference_loss, config=cfg))
            loss, met = fn(d["pc"], d["pr"], d["rc"], d["rr"], d["cm"], d["rm"], pair_mask_B=d["pm"],
                           kl_chosen_BT=d["kc"], kl_rejected_BT=d["kr"])  # fmt: skip
            want, extra = _np_tdpo(d["pc"], d["pr"], d["rc"], d["rr"], d["cm"], d["rm"], d["kc"], d["kr"],
                                   d["pm"], beta, variant, alpha)  # fmt: skip
            np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=f"TDPO{variant}")
            np.testing.assert_allclose(met["loss"], want, rtol=1e-5)
            for k, v in extra.items():
                np.testing.assert_allclose(met[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        # per-response reference sums work too (TDPO's margin only needs the sums)
        rc_B, rr_B = (d["rc"] * d["cm"]).sum(1), (d["rr"] * d["rm"]).sum(1)
        sums = losses.preference_loss(d["pc"], d["pr"], rc_B, rr_B, d["cm"], d["rm"], config=cfg,
                                      pair_mask_B=d["pm"], kl_chosen_BT=d["kc"],
                                      kl_rejected_BT=d["kr"])[0]  # fmt: skip
        np.testing.assert_allclose(sums, loss, rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_token_weighted_matches_float64_and_unit_weights_are_sigmoid_dpo_exactly(self):
        d = _batch(1)
        cfg = LossConfig(beta=0.4, loss_type="token_weighted")
        fn = self.variant(functools.partial(losses.preference_loss, config=cfg, pair_mask_B=d["pm"]))
        args = (d["pc"], d["pr"], d["rc"], d["rr"], d["cm"], d["rm"])
        loss, met = fn(*args, chosen_weights_BT=d["wc"], rejected_weights_BT=d["wr"])
        want, extra = _np_token_weighted(*args, d["wc"], d["wr"], d["pm"], 0.4)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        for k, v in extra.items():
            np.testing.assert_allclose(met[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        # all weights 1 (garbage at padding): the same float32 value as sigmoid DPO, and the same metrics
        ones_c = np.where(d["cm"] > 0, 1.0, 7.0).astype(np.float32)
        ones_r = np.where(d["rm"] > 0, 1.0, 7.0).astype(np.float32)
        got, m1 = fn(*args, chosen_weights_BT=ones_c, rejected_weights_BT=ones_r)
        dpo_cfg = LossConfig(beta=0.4, loss_type="sigmoid")
        dpo_fn = self.variant(functools.partial(losses.preference_loss, pair_mask_B=d["pm"], config=dpo_cfg))
        dpo, m0 = dpo_fn(*args)
        assert got.dtype == dpo.dtype == np.float32
        np.testing.assert_array_equal(got, dpo)
        for k in m0:
            np.testing.assert_array_equal(m1[k], m0[k], err_msg=k)
        np.testing.assert_array_equal(m1["token_weighted/rewards_chosen"], m0["rewards/chosen"])

    @chex.variants(with_jit=True, without_jit=True)
    def test_selective_matches_float64_and_ratio_one_is_simpo_exactly(self):
        d = _batch(2)
        for ratio in (0.3, 0.5, 1.0):
            cfg = LossConfig(beta=2.0, loss_type="selective", simpo_gamma=0.7, select_ratio=ratio)
            assert not cfg.needs_reference
            fn = self.variant(functools.partial(losses.preference_loss, config=cfg, pair_mask_B=d["pm"]))
            loss, met = fn(d["pc"], d["pr"], None, None, d["cm"], d["rm"],
                           chosen_oracle_BT=d["oc"], rejected_oracle_BT=d["orr"])  # fmt: skip
            want, extra = _np_selective(d["pc"], d["pr"], d["cm"], d["rm"], d["oc"], d["orr"], d["pm"],
                                        2.0, 0.7, ratio)  # fmt: skip
            np.testing.assert_allclose(loss, want, rtol=1e-5, err_msg=str(ratio))
            for k, v in extra.items():
                np.testing.assert_allclose(met[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
        simpo_fn = self.variant(functools.partial(losses.preference_loss, pair_mask_B=d["pm"],
                                config=LossConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7)))  # fmt: skip
        simpo, m0 = simpo_fn(d["pc"], d["pr"], None, None, d["cm"], d["rm"])
        assert loss.dtype == simpo.dtype == np.float32
        np.testing.assert_array_equal(loss, simpo)  # ratio 1 (the last one): every real token is selected
        np.testing.assert_array_equal(met["selective/logps_mean_chosen"], m0["logps_mean/chosen"])
        np.testing.assert_array_equal(met["selective/fraction_chosen"], 1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_lean_token_kl_equals_full_vocabulary_float64(self):
        rng = np.random.default_rng(3)
        P, R, D, Dr, V = 3, 7, 5, 4, 13
        hp = rng.normal(size=(P, R, D)).astype(np.float32)
        hr = rng.normal(size=(P, R, Dr)).astype(np.float32)  # the reference may be narrower
        wp = (2 * rng.normal(size=(D, V))).astype(np.float32)
        wr = (2 * rng.normal(size=(Dr, V))).astype(np.float32)
        mask = (np.arange(R)[None] < np.array([[7], [4], [1]])).astype(np.float32)
        lp = np.einsum("prd,dv->prv", *_f64(hp, wp))
        lr = np.einsum("prd,dv->prv", *_f64(hr, wr))
        for softcap in (None, 3.0):
            cap = (lambda x: x) if softcap is None else (lambda x, s=softcap: s * np.tanh(x / s))
            want = _np_kl(cap(lp), cap(lr)) * mask
            # chunk_size // P time steps per chunk: 1, 2 (does not divide R = 7), 3, and all of R
            for chunk_size in (1, 6, 9, 100):
                kl_fn = functools.partial(tokenq.lean_token_kl, chunk_size=chunk_size, softcap=softcap)
                got = self.variant(kl_fn)(hp, hr, wp, wr, mask)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{chunk_size} {softcap}")
            assert (np.asarray(got)[mask > 0] >= -1e-6).all()
        # without mask; same-width reference
        got = self.variant(functools.partial(tokenq.lean_token_kl, chunk_size=6))(hp, hp[..., :D], wp, wp)
        np.testing.assert_allclose(got, 0.0, atol=1e-6)  # KL of a model with itself


def test_lean_token_kl_gradients_match_dense_float64():
    rng = np.random.default_rng(4)
    P, R, D, V = 2, 5, 4, 9
    hp, hr = rng.normal(size=(P, R, D)), rng.normal(size=(P, R, D))
    wp, wr = rng.normal(size=(D, V)), rng.normal(size=(D, V))
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], np.float64)
    g_BT = rng.normal(size=(P, R))
    for softcap in (None, 2.5):
        def lean(hp, wp, hr, softcap=softcap):
            kl = tokenq.lean_token_kl(hp, hr, wp, wr, mask, chunk_size=4, softcap=softcap)
            return jnp.sum(kl * g_BT)

        def dense(hp, wp, hr, softcap=softcap):
            cap = (lambda x: x) if softcap is None else (lambda x: softcap * jnp.tanh(x / softcap))
            kl = tokenq.token_kl(cap(hp @ wp), cap(hr @ wr), mask)
            return jnp.sum(kl * g_BT)

        with jax.enable_x64(True):
            gl = jax.grad(lean, argnums=(0, 1, 2))(hp, wp, hr)
            gd = jax.grad(dense, argnums=(0, 1, 2))(hp, wp, hr)
            # the reference side as the caller passes it: a constant, no gradient
            g_ref = jax.grad(lambda h: lean(hp, wp, jax.lax.stop_gradient(h)))(hr)
        for a, b in zip(gl, gd, strict=True):
            assert a.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
        assert not np.asarray(g_ref).any()
        assert np.abs(np.asarray(gl[0])[mask == 0]).max() == 0  # masked positions get no gradient


def test_lean_token_kl_never_holds_a_full_logits_array_under_grad():
    """jax.checkpoint per chunk: neither the value nor the gradient's jaxpr holds an array as large as
    [P, R, V] (the scan's stacked per-chunk residuals would be, without the checkpoint)."""
    P, R, D, V = 2, 32, 8, 64
    hp, hr = jnp.ones((P, R, D)), jnp.ones((P, R, D))
    w = jnp.ones((D, V))

    def f(hp, wp):
        return jnp.sum(tokenq.lean_token_kl(hp, hr, wp, w, chunk_size=8))

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            for v in eqn.outvars:
                yield int(np.prod(v.aval.shape)) if hasattr(v.aval, "shape") else 0
            for p in eqn.params.values():
                for sub in p if isinstance(p, list | tuple) else (p,):
                    if hasattr(sub, "eqns"):  # a Jaxpr
                        yield from sizes(sub)
                    elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                        yield from sizes(sub.jaxpr)

    jaxpr = jax.make_jaxpr(jax.value_and_grad(f, argnums=(0, 1)))(hp, w)
    biggest = max(sizes(jaxpr.jaxpr))
    assert biggest < P * R * V, biggest  # a chunk's logits are [P, 4, V]
    assert biggest >= P * 4 * V


def test_tdpo_gradients_by_finite_differences_float64():
    d = _batch(5)
    for variant in (1, 2):
        cfg = LossConfig(beta=0.7, loss_type="tdpo", tdpo_variant=variant, tdpo_alpha=0.6)

        def f_jax(pc, pr, kc, kr, cfg=cfg):
            return losses.preference_loss(pc, pr, d["rc"], d["rr"], d["cm"], d["rm"], config=cfg,
                                          pair_mask_B=d["pm"], kl_chosen_BT=kc,
                                          kl_rejected_BT=kr)[0]  # fmt: skip

        def f_np(pc, pr, kc, kr, variant=variant):
            return _np_tdpo(pc, pr, d["rc"], d["rr"], d["cm"], d["rm"], kc, kr, d["pm"], 0.7, variant, 0.6)[0]

        args = [d["pc"], d["pr"], np.where(d["cm"] > 0, d["kc"], 0), np.where(d["rm"] > 0, d["kr"], 0)]
        which = (0, 1, 2, 3) if variant == 1 else (0, 1, 3)
        _check_grads(f_jax, f_np, args, which)
        if variant == 2:  # TDPO2 stops the gradient of the chosen response's sequential KL
            with jax.enable_x64(True):
                g = jax.grad(f_jax, argnums=2)(*[np.asarray(a, np.float64) for a in args])
            assert not np.asarray(g).any()


def test_tdpo_gradient_w_r_t_policy_hidden_states_float64():
    """The whole token-level path from the policy's final hidden states: lean log-probs and lean KL into
    TDPO, vs central differences of a dense float64 numpy forward. TDPO2's numpy reference freezes the
    chosen KL at the base point, which is what its stop-gradient means."""
    rng = np.random.default_rng(6)
    P, R, D, V = 2, 4, 3, 7
    hp_c, hp_r = rng.normal(size=(P, R, D)), rng.normal(size=(P, R, D))
    hr_c, hr_r = rng.normal(size=(P, R, D)), rng.normal(size=(P, R, D))
    w, w_ref = rng.normal(size=(D, V)), rng.normal(size=(D, V))
    tc, tr = rng.integers(0, V, size=(P, R)), rng.integers(0, V, size=(P, R))
    cm = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.float64)
    rm = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float64)

    def np_logps(h, w, t):
        lg = h @ w
        lg = lg - np.logaddexp.reduce(lg, axis=-1, keepdims=True)
        return np.take_along_axis(lg, t[..., None], -1)[..., 0]

    rc, rr = np_logps(hr_c, w_ref, tc) * cm, np_logps(hr_r, w_ref, tr) * rm
    kc0 = _np_kl(hp_c @ w, hr_c @ w_ref) * cm
    for variant in (1, 2):
        cfg = LossConfig(beta=0.5, loss_type="tdpo", tdpo_variant=variant, tdpo_alpha=0.5)

        def f_jax(hc, hr, cfg=cfg):
            pc = tokenq.lean_token_logps(hc, w, tc, cm, chunk_size=2)
            pr = tokenq.lean_token_logps(hr, w, tr, rm, chunk_size=2)
            kc = tokenq.lean_token_kl(hc, jax.lax.stop_gradient(hr_c), w, w_ref, cm, chunk_size=2)
            kr = tokenq.lean_token_kl(hr, jax.lax.stop_gradient(hr_r), w, w_ref, rm, chunk_size=2)
            return losses.preference_loss(pc, pr, rc, rr, cm, rm, config=cfg, kl_chosen_BT=kc,
                                          kl_rejected_BT=kr)[0]  # fmt: skip

        def f_np(hc, hr, variant=variant):
            pc, pr = np_logps(hc, w, tc) * cm, np_logps(hr, w, tr) * rm
            kc = _np_kl(hc @ w, hr_c @ w_ref) * cm if variant == 1 else kc0
            kr = _np_kl(hr @ w, hr_r @ w_ref) * rm
            return _np_tdpo(pc, pr, rc, rr, cm, rm, kc, kr, np.ones(P), 0.5, variant, 0.5)[0]

        _check_grads(f_jax, f_np, [hp_c, hp_r], (0, 1))


def test_token_weighted_and_selective_gradients_by_finite_differences_float64():
    d = _batch(7)
    cfg = LossConfig(beta=0.6, loss_type="token_weighted")
    _check_grads(
        lambda a, b: losses.preference_loss(a, b, d["rc"], d["rr"], d["cm"], d["rm"], config=cfg,
                                            pair_mask_B=d["pm"], chosen_weights_BT=d["wc"],
                                            rejected_weights_BT=d["wr"])[0],
        lambda a, b: _np_token_weighted(a, b, d["rc"], d["rr"], d["cm"], d["rm"], d["wc"], d["wr"],
                                        d["pm"], 0.6)[0],
        [d["pc"], d["pr"]], (0, 1),
    )  # fmt: skip
    cfg = LossConfig(beta=2.0, loss_type="selective", simpo_gamma=0.5, select_ratio=0.4)
    _check_grads(
        lambda a, b: losses.preference_loss(a, b, None, None, d["cm"], d["rm"], config=cfg,
                                            pair_mask_B=d["pm"], chosen_oracle_BT=d["oc"],
                                            rejected_oracle_BT=d["orr"])[0],
        lambda a, b: _np_selective(a, b, d["cm"], d["rm"], d["oc"], d["orr"], d["pm"], 2.0, 0.5, 0.4)[0],
        [d["pc"], d["pr"]], (0, 1),
    )  # fmt: skip


def test_select_tokens_by_hand():
    """Rule: k = max(1, floor(ratio · n + 1e-9)) of the n real tokens (0 if n = 0); top: highest
    rewards, bottom: lowest; ties to the earlier position; padding never selected."""
    r = np.array(
        [
            [0.5, 2.0, 2.0, -1.0, 2.0, 9.0, 9.0],  # 5 real tokens (the 9s are padding)
            [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],  # all tied, 7 real
            [3.0, -3.0, 0.0, -0.0, 0.0, 0.0, 0.0],  # 2 real + hole + 2 real (mask need not be a prefix)
            [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0],  # no real token
        ],
        np.float32,
    )
    m = np.array(
        [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0]],
        np.float32,
    )
    # ratio 0.5: k = 2, 3, 2, 0
    top = np.array([[0, 1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0, 0], [0] * 7])
    bot = np.array([[1, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [0, 1, 0, 1, 0, 0, 0], [0] * 7])
    for fn in (losses.select_tokens, jax.jit(losses.select_tokens, static_argnums=(2, 3))):
        np.testing.assert_array_equal(fn(r, m, 0.5, True), top)
        np.testing.assert_array_equal(fn(r, m, 0.5, False), bot)
        # ratio 0.1: k = max(1, 0) = 1 for every non-empty row
        np.testing.assert_array_equal(fn(r, m, 0.1, True).sum(1), [1, 1, 1, 0])
        np.testing.assert_array_equal(fn(r, m, 0.1, True)[0], [0, 1, 0, 0, 0, 0, 0])  # first of the tied 2.0s
        np.testing.assert_array_equal(fn(r, m, 1.0, False), m)  # ratio 1 selects exactly the mask
    assert fn(r, m, 0.5, True).dtype == np.float32
    # the rounding rule on counts: 0.29 · 100 is 28.999… in floating point and selects 29; 0.3 · 10 -> 3
    np.testing.assert_array_equal(losses.select_ratio_counts(100, 0.29)[[0, 1, 3, 10, 100]], [0, 1, 1, 2, 29])
    np.testing.assert_array_equal(losses.select_ratio_counts(10, 0.3)[[3, 4, 7, 10]], [1, 1, 2, 3])
    # random rows against the hand-written rule, with many ties
    rng = np.random.default_rng(8)
    rr = rng.integers(-2, 3, size=(16, 11)).astype(np.float32)
    mm = (rng.uniform(size=(16, 11)) < 0.7).astype(np.float32)
    for ratio in (0.2, 0.3, 0.77, 1.0):
        for is_top in (True, False):
            got = losses.select_tokens(rr, mm, ratio, is_top)
            np.testing.assert_array_equal(got, _np_select(rr, mm, ratio, is_top))
    # a selection, not a gradient path
    g = jax.grad(lambda x: jnp.sum(losses.select_tokens(x, m, 0.5, True)))(r)
    assert not np.asarray(g).any()


def test_tis_dpo_weights_formula():
    rng = np.random.default_rng(9)
    pos = np.log(rng.uniform(0.05, 0.95, size=(3, 5))).astype(np.float32)
    neg = np.log(rng.uniform(0.05, 0.95, size=(3, 5))).astype(np.float32)
    m = (np.arange(5)[None] < np.array([[5], [2], [0]])).astype(np.float32)
    dlt = np.clip(pos.astype(np.float64) - neg, -0.5, 1.5)
    wc = losses.tis_dpo_weights(pos, neg, m, chosen=True, lower=-0.5, upper=1.5, mu=0.8, k=1.2)
    wr = losses.tis_dpo_weights(pos, neg, m, chosen=False, lower=-0.5, upper=1.5, mu=0.8, k=1.2)
    np.testing.assert_allclose(wc, 1.2 * np.exp(0.8 * dlt) * m, rtol=1e-6)
    np.testing.assert_allclose(wr, 1.2 * np.exp(-0.8 * dlt) * m, rtol=1e-6)
    assert (np.asarray(wc) >= 0).all() and not np.asarray(wc)[m == 0].any()
    # equal models give weight k to every real token
    np.testing.assert_allclose(losses.tis_dpo_weights(pos, pos, m, chosen=True, lower=-1, upper=1), m)
    g = jax.grad(lambda a: jnp.sum(losses.tis_dpo_weights(a, neg, m, chosen=True, lower=-1, upper=1)))(pos)
    assert not np.asarray(g).any()  # constants of the loss
    with pytest.raises(ValueError, match="lower must be <= upper"):
        losses.tis_dpo_weights(pos, neg, m, chosen=True, lower=1.0, upper=0.0)


def test_mixture_with_token_level_types_is_the_weighted_sum():
    d = _batch(10)
    kw = dict(pair_mask_B=d["pm"], kl_chosen_BT=d["kc"], kl_rejected_BT=d["kr"], chosen_weights_BT=d["wc"],
              rejected_weights_BT=d["wr"], chosen_oracle_BT=d["oc"], rejected_oracle_BT=d["orr"])  # fmt: skip
    args = (d["pc"], d["pr"], d["rc"], d["rr"], d["cm"], d["rm"])
    parts = [losses.preference_loss(*args, config=LossConfig(beta=0.3, loss_type=t), **kw)[0]
             for t in ("tdpo", "token_weighted", "selective")]  # fmt: skip
    mix = LossConfig(beta=0.3, loss_type="tdpo,token_weighted,selective", loss_weights=(0.5, 0.3, 0.2))
    got, met = losses.preference_loss(*args, config=mix, **kw)
    np.testing.assert_allclose(got, 0.5 * parts[0] + 0.3 * parts[1] + 0.2 * parts[2], rtol=1e-6)
    assert {"tdpo/seq_kl_chosen", "token_weighted/weight_chosen", "selective/fraction_chosen"} <= set(met)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="tdpo", tdpo_variant=3), "tdpo_variant must be 1 or 2"),
        (dict(loss_type="tdpo", tdpo_variant=True), "tdpo_variant must be 1 or 2"),
        (dict(loss_type="tdpo", tdpo_alpha=-0.1), "tdpo_alpha"),
        (dict(loss_type="tdpo", tdpo_alpha=float("nan")), "tdpo_alpha"),
        (dict(loss_type="selective", select_ratio=0.0), "select_ratio"),
        (dict(loss_type="selective", select_ratio=1.5), "select_ratio"),
        (dict(loss_type="token_weighted", ld_alpha=0.5), "ld_alpha"),
        (dict(loss_type="sigmoid,tdpo", ld_alpha=0.5), "ld_alpha"),
        (dict(loss_type="tdpo", f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(loss_type="outcome_ce,selective"), "do not mix"),
    ],
)
def test_bad_token_level_config_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        LossConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_missing_or_misshapen_token_inputs_are_clear_errors():
    d = _batch(11)
    args = (d["pc"], d["pr"], d["rc"], d["rr"], d["cm"], d["rm"])
    for t, needs in (("tdpo", "kl_chosen_BT and kl_rejected_BT"),
                     ("token_weighted", "chosen_weights_BT and rejected_weights_BT"),
                     ("selective", "chosen_oracle_BT and rejected_oracle_BT")):  # fmt: skip
        with pytest.raises(ValueError, match=f"loss_type '{t}' needs {needs}") as e:
            losses.preference_loss(*args, config=LossConfig(loss_type=t))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"kl_rejected_BT has shape \(6, 3\)"):
        losses.preference_loss(*args, config=LossConfig(loss_type="tdpo"), kl_chosen_BT=d["kc"],
                               kl_rejected_BT=d["kr"][:, :3])  # fmt: skip
    with pytest.raises(ValueError, match="'token_weighted' needs per-token reference"):
        losses.preference_loss(d["pc"], d["pr"], d["rc"].sum(1), d["rr"].sum(1), d["cm"], d["rm"],
                               config=LossConfig(loss_type="token_weighted"), chosen_weights_BT=d["wc"],
                               rejected_weights_BT=d["wr"])  # fmt: skip
    with pytest.raises(ValueError, match="needs reference"):
        losses.preference_loss(d["pc"], d["pr"], None, None, d["cm"], d["rm"],
                               config=LossConfig(loss_type="tdpo"), kl_chosen_BT=d["kc"],
                               kl_rejected_BT=d["kr"])  # fmt: skip
    with pytest.raises(ValueError, match="ratio must be a number in"):
        losses.select_tokens(d["oc"], d["cm"], 0.0, True)
    with pytest.raises(ValueError, match="h_ref_PRD has shape"):
        tokenq.lean_token_kl(np.ones((2, 3, 4)), np.ones((2, 4, 4)), np.ones((4, 5)), np.ones((4, 5)))
    with pytest.raises(ValueError, match="unembed_ref_DV has shape"):
        tokenq.lean_token_kl(np.ones((2, 3, 4)), np.ones((2, 3, 4)), np.ones((4, 5)), np.ones((4, 6)))
    cfg = LossConfig(loss_type="tdpo")
    assert cfg.needs_reference and cfg.needs_token_kl and not cfg.needs_token_weights
    assert LossConfig(loss_type="token_weighted").needs_token_weights
    assert LossConfig(loss_type="selective").needs_oracle_rewards
    assert not LossConfig(loss_type="selective").needs_reference
