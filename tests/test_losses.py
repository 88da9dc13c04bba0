"""dpoq_jax.losses against float64 numpy references; masking, dummy pairs, devices."""

import functools
import pathlib

import chex
import jax
import numpy as np
import pytest
from helpers import central_difference, local_batches, run_steps, tiny_config
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dpoq_jax import losses, tokenq
from dpoq_jax.losses import LossConfig

B, T = 8, 5


def _np_log_sigmoid(z):
    return -np.logaddexp(0.0, -z)


def _np_pair_loss(h, cfg):
    z, eps, beta = cfg.beta * h, cfg.label_smoothing, cfg.beta
    if cfg.loss_type == "sigmoid":
        return -_np_log_sigmoid(z)
    if cfg.loss_type == "cdpo":
        return -(1 - eps) * _np_log_sigmoid(z) - eps * _np_log_sigmoid(-z)
    if cfg.loss_type == "robust":
        return (-(1 - eps) * _np_log_sigmoid(z) + eps * _np_log_sigmoid(-z)) / (1 - 2 * eps)
    if cfg.loss_type == "hinge":
        return np.maximum(0.0, 1 - z)
    return (h - 1 / (2 * beta)) ** 2


def _np_loss(pc, pr, rc, rr, cm, rm, cfg, pm):
    """Float64 reference: the pair-weighted mean loss and the sequence-level metrics."""
    f = lambda x: np.asarray(x, np.float64)  # noqa: E731
    pc, pr, rc, rr, cm, rm, pm = map(f, (pc, pr, rc, rr, cm, rm, pm))
    sc, sr = (pc * cm).sum(1), (pr * rm).sum(1)
    qc, qr = (rc * cm).sum(1), (rr * rm).sum(1)
    if cfg.loss_type == "ipo" and cfg.ipo_average:
        h = (sc - qc) / cm.sum(1) - (sr - qr) / rm.sum(1)
    else:
        h = (sc - qc) - (sr - qr)
    mean = lambda x: (x * pm).sum() / pm.sum()  # noqa: E731
    loss = mean(_np_pair_loss(h, cfg))
    if cfg.sft_weight:
        loss += cfg.sft_weight * (-(pc * cm * pm[:, None]).sum() / (cm * pm[:, None]).sum())
    rwc, rwr = cfg.beta * (sc - qc), cfg.beta * (sr - qr)
    tc, tr = cfg.beta * (pc - rc), cfg.beta * (pr - rr)
    real_c, real_r = (cm * pm[:, None]) > 0, (rm * pm[:, None]) > 0
    metrics = {
        "rewards/chosen": mean(rwc),
        "rewards/rejected": mean(rwr),
        "rewards/margins": mean(rwc - rwr),
        "rewards/accuracies": mean((rwc > rwr).astype(float)),
        "logps/chosen": mean(sc),
        "logps/rejected": mean(sr),
        "logps_mean/chosen": mean(sc / cm.sum(1)),
        "logps_mean/rejected": mean(sr / rm.sum(1)),
        "token_rewards/chosen_mean": tc[real_c].mean(),
        "token_rewards/chosen_min": tc[real_c].min(),
        "token_rewards/rejected_mean": tr[real_r].mean(),
        "token_rewards/rejected_min": tr[real_r].min(),
    }
    return loss, metrics


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    lp = lambda: np.log(rng.uniform(0.05, 0.95, size=(B, T))).astype(np.float32)  # noqa: E731
    pc, pr, rc, rr = lp(), lp(), lp(), lp()
    cm = (np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))).astype(np.float32)
    rm = (np.arange(T)[None] < rng.integers(1, T + 1, size=(B, 1))).astype(np.float32)
    pc, pr, rc, rr = pc * cm, pr * rm, rc * cm, rr * rm  # 0 where padded, as token_logps gives
    pm = np.ones(B, np.float32)
    pm[-2:] = 0  # two dummy pairs
    return pc, pr, rc, rr, cm, rm, pm


CONFIGS = [
    LossConfig(beta=0.1, loss_type="sigmoid"),
    LossConfig(beta=0.5, loss_type="cdpo", label_smoothing=0.2),
    LossConfig(beta=0.5, loss_type="robust", label_smoothing=0.2),
    LossConfig(beta=0.7, loss_type="hinge"),
    LossConfig(beta=0.3, loss_type="ipo", ipo_average=True),
    LossConfig(beta=0.3, loss_type="ipo", ipo_average=False),
    LossConfig(beta=0.2, loss_type="sigmoid", sft_weight=0.5),
]


class PreferenceLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_values_metrics_and_grads_match_float64(self):
        pc, pr, rc, rr, cm, rm, pm = _batch()
        for cfg in CONFIGS:
            fn = self.variant(functools.partial(losses.preference_loss, config=cfg))
            loss, metrics = fn(pc, pr, rc, rr, cm, rm, pair_mask_B=pm)
            ref_loss, ref_metrics = _np_loss(pc, pr, rc, rr, cm, rm, cfg, pm)
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6, err_msg=cfg.loss_type)
            np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5, atol=1e-6)
            for k, v in ref_metrics.items():
                np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=f"{cfg} {k}")
            # TRL's `logits/*` (mean raw logit) is not something this loss sees: no metric takes the name
            assert not [k for k in metrics if k.startswith("logits/")]
            # gradient w.r.t. the policy's per-token log-probs vs float64 central differences
            g = jax.grad(
                lambda a, b, c=cfg: losses.preference_loss(a, b, rc, rr, cm, rm, config=c, pair_mask_B=pm)[0],
                argnums=(0, 1),
            )(pc, pr)
            for which in (0, 1):
                num = np.zeros((B, T))
                for i in range(B):
                    for t in range(T):
                        e = np.zeros((B, T))
                        e[i, t] = 1e-6
                        args = [pc.astype(np.float64), pr.astype(np.float64)]
                        plus, minus = list(args), list(args)
                        plus[which] = args[which] + e
                        minus[which] = args[which] - e
                        num[i, t] = (
                            _np_loss(*plus, rc, rr, cm, rm, cfg, pm)[0]
                            - _np_loss(*minus, rc, rr, cm, rm, cfg, pm)[0]
                        ) / 2e-6
                np.testing.assert_allclose(g[which], num, atol=2e-5, err_msg=cfg.loss_type)

    def test_reference_sums_equal_per_token_refs(self):
        pc, pr, rc, rr, cm, rm, pm = _batch(1)
        cfg = LossConfig(beta=0.2, loss_type="sigmoid")
        l1, m1 = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)
        l2, m2 = losses.preference_loss(
            pc, pr, (rc * cm).sum(1), (rr * rm).sum(1), cm, rm, config=cfg, pair_mask_B=pm
        )
        np.testing.assert_allclose(l1, l2, rtol=1e-6)
        for k in m2:
            np.testing.assert_allclose(m1[k], m2[k], rtol=1e-5, atol=1e-6)
        assert "token_rewards/chosen_mean" in m1 and "token_rewards/chosen_mean" not in m2

    def test_dummy_pairs_and_padding_never_count(self):
        pc, pr, rc, rr, cm, rm, pm = _batch(2)
        cfg = LossConfig(beta=0.2, loss_type="cdpo", label_smoothing=0.1, sft_weight=0.3)
        loss, metrics = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)
        # garbage in dummy pairs and in padded tokens
        junk = [x.copy() for x in (pc, pr, rc, rr)]
        for x, m in zip(junk, (cm, rm, cm, rm), strict=True):
            x[pm == 0] = -1e4
            x[m == 0] = 1e4
        loss2, metrics2 = losses.preference_loss(*junk, cm, rm, config=cfg, pair_mask_B=pm)
        np.testing.assert_allclose(loss, loss2, rtol=1e-6)
        for k in metrics:
            np.testing.assert_allclose(metrics[k], metrics2[k], rtol=1e-5, err_msg=k)
        # equal to the loss on the real pairs alone
        real = pm > 0
        loss3, _ = losses.preference_loss(*(x[real] for x in (pc, pr, rc, rr, cm, rm)), config=cfg)
        np.testing.assert_allclose(loss, loss3, rtol=1e-6)

    def test_logit_shift_invariance(self):
        rng = np.random.default_rng(3)
        logits = rng.normal(size=(4, 2, T, 7)).astype(np.float32)
        targets = rng.integers(0, 7, size=(2, 2, T))
        mask = np.ones((2, T), np.float32)
        mask[1, 3:] = 0

        def loss_of(lg):
            lp = [tokenq.token_logps(lg[i], targets[i % 2], mask) for i in range(4)]
            return losses.preference_loss(lp[0], lp[1], lp[2], lp[3], mask, mask, config=LossConfig(beta=0.4))

        l1, m1 = loss_of(logits)
        l2, m2 = loss_of(logits + 50 * rng.normal(size=(4, 2, T, 1)).astype(np.float32))
        np.testing.assert_allclose(l1, l2, rtol=1e-4)
        np.testing.assert_allclose(m1["rewards/margins"], m2["rewards/margins"], rtol=1e-4, atol=1e-5)

    def test_sft_loss(self):
        pc, _, _, _, cm, _, pm = _batch(4)
        loss, metrics = losses.sft_loss(pc, cm, pair_mask_B=pm)
        w = cm * pm[:, None]
        np.testing.assert_allclose(loss, -(pc * w).sum() / w.sum(), rtol=1e-6)
        assert metrics["tokens"] == w.sum()

    def test_bad_config_and_shapes(self):
        with pytest.raises(ValueError, match="loss_type"):
            LossConfig(loss_type="kto")
        with pytest.raises(ValueError, match="beta"):
            LossConfig(beta=0.0)
        with pytest.raises(ValueError, match="label_smoothing"):
            LossConfig(loss_type="robust", label_smoothing=0.5)
        pc, pr, rc, rr, cm, rm, _ = _batch()
        with pytest.raises(ValueError, match="rejected_mask_BT"):
            losses.preference_loss(pc, pr, rc, rr, cm, rm[:, :-1], config=LossConfig())
        with pytest.raises(ValueError, match="ref_chosen"):
            losses.preference_loss(pc, pr, rc[..., None], rr, cm, rm, config=LossConfig())


def _mean_over_devices_matches(n_dev, run):
    pc, pr, rc, rr, cm, rm, pm = _batch(5)
    cfg = LossConfig(beta=0.3, loss_type="sigmoid", sft_weight=0.2)
    ref_loss, ref_metrics = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)
    loss, metrics = run(cfg, (pc, pr, rc, rr, cm, rm, pm))
    np.testing.assert_allclose(np.asarray(loss).reshape(-1), np.full(np.size(loss), ref_loss), rtol=1e-5)
    for k, v in ref_metrics.items():
        np.testing.assert_allclose(np.asarray(metrics[k]).reshape(-1)[0], v, rtol=1e-5, atol=1e-6, err_msg=k)


def test_pmap_on_4_devices_equals_single_device():
    assert jax.device_count() >= 4

    def run(cfg, arrays):
        split = [x.reshape(4, B // 4, *x.shape[1:]) for x in arrays]

        def local(a, b, c, d, e, f, g):
            return losses.preference_loss(a, b, c, d, e, f, config=cfg, pair_mask_B=g, axis_name="i")

        fn = jax.pmap(local, axis_name="i", devices=jax.devices()[:4])
        return fn(*split)

    _mean_over_devices_matches(4, run)


def test_shard_map_and_sharded_jit_equal_single_device():
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])

    def run_shard_map(cfg, arrays):
        def local(a, b, c, d, e, f, g):
            return losses.preference_loss(a, b, c, d, e, f, config=cfg, pair_mask_B=g, axis_name="data")

        arrays = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in arrays]
        fn = jax.shard_map(local, mesh=mesh, in_specs=P("data"), out_specs=P())
        return jax.jit(fn)(*arrays)

    def run_sharded_jit(cfg, arrays):
        arrays = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in arrays]
        fn = jax.jit(
            lambda a, b, c, d, e, f, g: losses.preference_loss(a, b, c, d, e, f, config=cfg, pair_mask_B=g)
        )
        return fn(*arrays)

    _mean_over_devices_matches(4, run_shard_map)
    _mean_over_devices_matches(4, run_sharded_jit)


# ---------------------------------------------------------------------------------------------
# Reference-free objectives, outcome labels, LD-DPO, length normalisation, WPO's input


def _f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def _np_simpo(pc, pr, cm, rm, pm, beta, gamma):
    """SimPO (Meng et al. 2024, Eq. 6): −log σ(β/|y_w| log π(y_w) − β/|y_l| log π(y_l) − γ)."""
    pc, pr, cm, rm, pm = _f64(pc, pr, cm, rm, pm)
    d = beta * ((pc * cm).sum(1) / cm.sum(1) - (pr * rm).sum(1) / rm.sum(1)) - gamma
    return (-_np_log_sigmoid(d) * pm).sum() / pm.sum()


def _np_orpo(pc, pr, cm, rm, pm, lam):
    """ORPO (Hong et al. 2024, Eq. 6-7): NLL of y_w per token − λ log σ(log odds(y_w)/odds(y_l)),
    odds(y) = P(y)/(1 − P(y)) with log P(y) the mean per-token log-prob."""
    pc, pr, cm, rm, pm = _f64(pc, pr, cm, rm, pm)
    lc, lr = (pc * cm).sum(1) / cm.sum(1), (pr * rm).sum(1) / rm.sum(1)
    log_odds = lambda lp: lp - np.log1p(-np.exp(lp))  # noqa: E731
    ratio = _np_log_sigmoid(log_odds(lc) - log_odds(lr))
    w = cm * pm[:, None]
    nll = -(pc * w).sum() / w.sum()
    return nll + (-lam * ratio * pm).sum() / pm.sum()


def _np_outcome(p, r, m, label, beta):
    p, r, m, label = _f64(p, r, m, label)
    rew = beta * ((p - r) * m).sum(1)
    return -(label * _np_log_sigmoid(rew) + (1 - label) * _np_log_sigmoid(-rew)).mean()


def _np_apo_zero_unpaired(p, r, m, label, beta, wd=1.0, wu=1.0, em=None):
    """TRL 1.16 KTOTrainer, loss_type apo_zero_unpaired: good 1 − σ(βu), bad σ(βu), weighted by
    desirable/undesirable_weight, mean over the responses."""
    p, r, m, label = _f64(p, r, m, label)
    em = np.ones(len(label)) if em is None else np.asarray(em, np.float64)
    sig = 1 / (1 + np.exp(-beta * ((p - r) * m).sum(1)))
    per = wd * label * (1 - sig) + wu * (1 - label) * sig
    return (per * em).sum() / em.sum()


def _np_sigmoid_norm(pc, pr, rc, rr, cm, rm, pm, beta, alpha=1.0):
    """TRL's sigmoid_norm with LD-DPO: token weights 1 up to min(|y_w|,|y_l|), α after; scores divided
    by the unweighted lengths."""
    pc, pr, rc, rr, cm, rm, pm = _f64(pc, pr, rc, rr, cm, rm, pm)
    shared = np.minimum(cm.sum(1), rm.sum(1))[:, None]
    wc = np.where(np.cumsum(cm, 1) <= shared, 1.0, alpha) * cm
    wr = np.where(np.cumsum(rm, 1) <= shared, 1.0, alpha) * rm
    d = ((pc - rc) * wc).sum(1) / cm.sum(1) - ((pr - rr) * wr).sum(1) / rm.sum(1)
    return (-_np_log_sigmoid(beta * d) * pm).sum() / pm.sum()


def _np_sigmoid_ld(pc, pr, rc, rr, cm, rm, pm, beta, alpha):
    pc, pr, rc, rr, cm, rm, pm = _f64(pc, pr, rc, rr, cm, rm, pm)
    shared = np.minimum(cm.sum(1), rm.sum(1))[:, None]
    wc = np.where(np.cumsum(cm, 1) <= shared, 1.0, alpha) * cm
    wr = np.where(np.cumsum(rm, 1) <= shared, 1.0, alpha) * rm
    d = ((pc - rc) * wc).sum(1) - ((pr - rr) * wr).sum(1)
    return (-_np_log_sigmoid(beta * d) * pm).sum() / pm.sum()


def test_unpaired_losses_float64_with_weights_and_dummies():
    pc, _, rc, _, cm, _, pm = _batch(11)
    label = (np.arange(B) % 3 == 0).astype(np.float32)
    kw = dict(beta=0.4, desirable_weight=1.5, undesirable_weight=0.5, example_mask_B=pm)
    loss, met = losses.outcome_loss(pc, rc, cm, label, loss_type="apo_zero_unpaired", **kw)
    np.testing.assert_allclose(loss, _np_apo_zero_unpaired(pc, rc, cm, label, 0.4, 1.5, 0.5, pm), rtol=1e-6)
    loss, met = losses.outcome_loss(pc, rc, cm, label, **kw)  # outcome_ce, weighted
    p, r, m, lab = _f64(pc, rc, cm, label)
    rew = 0.4 * ((p - r) * m).sum(1)
    per = -(1.5 * lab * _np_log_sigmoid(rew) + 0.5 * (1 - lab) * _np_log_sigmoid(-rew))
    np.testing.assert_allclose(loss, (per * pm).sum() / pm.sum(), rtol=1e-6)
    good, bad = pm * (lab > 0.5), pm * (lab <= 0.5)
    np.testing.assert_allclose(met["rewards/chosen"], (rew * good).sum() / good.sum(), rtol=1e-5)
    np.testing.assert_allclose(met["logps/rejected"], ((p * m).sum(1) * bad).sum() / bad.sum(), rtol=1e-5)
    np.testing.assert_allclose(met["rewards/margins"], met["rewards/chosen"] - met["rewards/rejected"])
    tok = 0.4 * (p - r) * m * good[:, None]
    np.testing.assert_allclose(met["token_rewards/chosen_mean"], tok.sum() / (m * good[:, None]).sum(),
                               rtol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="is unpaired; use losses.outcome_loss"):
        losses.preference_loss(pc, pc, rc, rc, cm, cm, config=LossConfig(loss_type="outcome_ce"))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        losses.outcome_loss(pc, rc, cm, label, beta=0.1, loss_type="sigmoid")


def test_simpo_and_orpo_match_float64_formulas_without_reference():
    pc, pr, _, _, cm, rm, pm = _batch(7)
    cfg = LossConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.7)
    assert not cfg.needs_reference and not LossConfig(loss_type="orpo").needs_reference
    assert LossConfig(loss_type="simpo,sigmoid").needs_reference
    loss, m = jax.jit(lambda *a: losses.preference_loss(*a, config=cfg, pair_mask_B=pm))(
        pc, pr, None, None, cm, rm
    )
    np.testing.assert_allclose(loss, _np_simpo(pc, pr, cm, rm, pm, 2.0, 0.7), rtol=1e-6)
    # SimPO's reward is β × the mean per-token log-prob; no token-level implicit rewards without a reference
    avg = (pc * cm).sum(1) / cm.sum(1)
    np.testing.assert_allclose(m["rewards/chosen"], (2.0 * avg * pm).sum() / pm.sum(), rtol=1e-6)
    assert not [k for k in m if k.startswith("token_rewards/")]
    cfg = LossConfig(beta=0.25, loss_type="orpo")
    loss, m = losses.preference_loss(pc, pr, None, None, cm, rm, config=cfg, pair_mask_B=pm)
    np.testing.assert_allclose(loss, _np_orpo(pc, pr, cm, rm, pm, 0.25), rtol=1e-6)
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(m)
    with pytest.raises(ValueError, match="needs reference"):
        losses.preference_loss(pc, pr, None, None, cm, rm, config=LossConfig(loss_type="sigmoid"))


def test_orpo_is_finite_with_empty_dummy_pairs():
    pc, pr, _, _, cm, rm, pm = _batch(8)
    cm, rm = cm.copy(), rm.copy()
    cm[pm == 0], rm[pm == 0] = 0, 0  # dummy pairs without tokens: mean log-prob 0, log(1 − 1) = −inf
    cfg = LossConfig(beta=0.25, loss_type="orpo")
    g = jax.grad(lambda a, b: losses.preference_loss(a, b, None, None, cm, rm, config=cfg, pair_mask_B=pm)[0],
                 argnums=(0, 1))(pc, pr)  # fmt: skip
    assert all(np.isfinite(x).all() for x in g)


def test_outcome_loss_float64_and_one_token_by_hand():
    # one token, β = 1, π = 1/2, π_ref = 1/4: r = log 2, σ(r) = 2/3 -> loss log 3/2 (good), log 3 (bad)
    p = np.log(np.array([[0.5], [0.5]], np.float32))
    r = np.log(np.array([[0.25], [0.25]], np.float32))
    m = np.ones((2, 1), np.float32)
    loss, met = losses.outcome_loss(
        p, r, m, np.array([1.0, 0.0]), beta=1.0, example_mask_B=np.array([1.0, 0.0])
    )
    np.testing.assert_allclose(loss, np.log(1.5), rtol=1e-6)
    loss, met = losses.outcome_loss(p, r, m, np.array([0.0, 0.0]), beta=1.0)
    np.testing.assert_allclose(loss, np.log(3.0), rtol=1e-6)
    np.testing.assert_allclose(met["rewards/accuracies"], 0.0)
    rng = np.random.default_rng(9)
    pc, _, rc, _, cm, _, _ = _batch(9)
    label = rng.uniform(size=B).astype(np.float32)  # soft labels too
    loss, met = jax.jit(functools.partial(losses.outcome_loss, beta=0.3))(pc, rc, cm, label)
    np.testing.assert_allclose(loss, _np_outcome(pc, rc, cm, label, 0.3), rtol=1e-6)
    loss_sum, _ = losses.outcome_loss(pc, (rc * cm).sum(1), cm, label, beta=0.3)  # per-response sums
    np.testing.assert_allclose(loss_sum, loss, rtol=1e-6)
    g = jax.grad(lambda a: losses.outcome_loss(a, rc, cm, label, beta=0.3)[0])(pc)
    rew = 0.3 * ((pc - rc) * cm).sum(1)
    sig = 1 / (1 + np.exp(-rew.astype(np.float64)))
    np.testing.assert_allclose(g, (-(label - sig) * 0.3 / B)[:, None] * cm, rtol=1e-5, atol=1e-7)


def _fd_check(f_jax, f_np, args, which=(0, 1), h=1e-6, atol=1e-9):
    """Float64 gradient of f_jax w.r.t. args[i] vs central differences of the float64 formula f_np."""
    with jax.enable_x64(True):
        a64 = [np.asarray(x, np.float64) for x in args]
        assert f_jax(*a64).dtype == np.float64
        g = jax.grad(lambda *xs: f_jax(*xs), argnums=which)(*a64)
        for gi, i in zip(g, which, strict=True):
            num = central_difference(f_np, a64, i, h)
            np.testing.assert_allclose(np.asarray(gi), num, atol=atol, rtol=1e-6)
            assert np.abs(num).max() > 1e-4  # the check is not vacuous


def test_gradients_by_finite_differences_float64():
    pc, pr, rc, rr, cm, rm, pm = _batch(10)
    cm[0, :], rm[0, :] = 1, 0
    rm[0, :2] = 1  # lengths 5 and 2: the LD-DPO tail is non-empty
    cfg = LossConfig(beta=0.4, loss_type="sigmoid_norm")
    _fd_check(lambda a, b: losses.preference_loss(a, b, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)[0],
              lambda a, b: _np_sigmoid_norm(a, b, rc, rr, cm, rm, pm, 0.4), [pc, pr])  # fmt: skip
    cfg = LossConfig(beta=0.4, loss_type="sigmoid_norm", ld_alpha=0.3)
    _fd_check(lambda a, b: losses.preference_loss(a, b, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)[0],
              lambda a, b: _np_sigmoid_norm(a, b, rc, rr, cm, rm, pm, 0.4, 0.3), [pc, pr])  # fmt: skip
    cfg = LossConfig(beta=0.4, loss_type="sigmoid", ld_alpha=0.3)
    _fd_check(lambda a, b: losses.preference_loss(a, b, rc, rr, cm, rm, config=cfg, pair_mask_B=pm)[0],
              lambda a, b: _np_sigmoid_ld(a, b, rc, rr, cm, rm, pm, 0.4, 0.3), [pc, pr])  # fmt: skip
    cfg = LossConfig(beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    _fd_check(lambda a, b: losses.preference_loss(a, b, None, None, cm, rm, config=cfg, pair_mask_B=pm)[0],
              lambda a, b: _np_simpo(a, b, cm, rm, pm, 2.0, 0.5), [pc, pr])  # fmt: skip
    cfg = LossConfig(beta=0.3, loss_type="orpo")
    _fd_check(lambda a, b: losses.preference_loss(a, b, None, None, cm, rm, config=cfg, pair_mask_B=pm)[0],
              lambda a, b: _np_orpo(a, b, cm, rm, pm, 0.3), [pc, pr])  # fmt: skip


def test_ld_alpha_one_is_plain_dpo_and_zero_cuts_the_tail():
    pc, pr, rc, rr, cm, rm, pm = _batch(11)
    plain = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=LossConfig(beta=0.3), pair_mask_B=pm)[0]
    one = LossConfig(beta=0.3, ld_alpha=1.0)
    np.testing.assert_allclose(
        losses.preference_loss(pc, pr, rc, rr, cm, rm, config=one, pair_mask_B=pm)[0], plain
    )
    # α = 0: tokens past the shorter response's length never matter
    zero = LossConfig(beta=0.3, ld_alpha=0.0)
    l0 = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=zero, pair_mask_B=pm)[0]
    shared = np.minimum(cm.sum(1), rm.sum(1))[:, None]
    tail_c = (np.cumsum(cm, 1) > shared) & (cm > 0)
    pc2 = np.where(tail_c, pc - 5.0, pc)
    np.testing.assert_allclose(
        losses.preference_loss(pc2, pr, rc, rr, cm, rm, config=zero, pair_mask_B=pm)[0], l0
    )
    assert tail_c.any()
    with pytest.raises(ValueError, match="per-token reference"):
        losses.preference_loss(pc, pr, rc.sum(1), rr.sum(1), cm, rm, config=LossConfig(ld_alpha=0.5))


def test_mixture_is_the_weighted_sum_of_its_parts():
    pc, pr, rc, rr, cm, rm, pm = _batch(12)
    one = lambda t: LossConfig(beta=0.3, loss_type=t)  # noqa: E731
    parts = [losses.preference_loss(pc, pr, rc, rr, cm, rm, config=one(t), pair_mask_B=pm)[0]
             for t in ("sigmoid", "bco_pair", "sft")]  # fmt: skip
    mix = LossConfig(beta=0.3, loss_type="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))
    got = losses.preference_loss(pc, pr, rc, rr, cm, rm, config=mix, pair_mask_B=pm)[0]
    np.testing.assert_allclose(got, 0.8 * parts[0] + 0.2 * parts[1] + parts[2], rtol=1e-6)


def test_lean_log_sum_sq_probs_equals_dense_float64():
    rng = np.random.default_rng(13)
    h = rng.normal(size=(3, 7, 5)).astype(np.float32)
    w = (3 * rng.normal(size=(5, 11))).astype(np.float32)
    mask = (np.arange(7)[None] < np.array([[7], [4], [1]])).astype(np.float32)
    logits = h.astype(np.float64) @ w.astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.log(np.exp(2 * logp).sum(-1)) * mask
    got = tokenq.lean_log_sum_sq_probs(h, w, mask, chunk_size=4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        tokenq.log_sum_sq_probs(logits.astype(np.float32)) * mask, want, rtol=1e-5, atol=1e-5
    )
    # no gradient flows through WPO's weights
    g = jax.grad(lambda x: tokenq.lean_log_sum_sq_probs(x, w, mask, chunk_size=4).sum())(h)
    assert not np.asarray(g).any()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="kto"), "unknown"),
        (dict(loss_type="sigmoid,dpo"), "unknown"),
        (dict(loss_type="sigmoid,sft", loss_weights=(1.0,)), "1 weights for the 2 types"),
        (dict(ld_alpha=1.5), "ld_alpha"),
        (dict(ld_alpha=-0.1), "ld_alpha"),
        (dict(loss_type="exo_pair"), "exo_pair"),
        (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
        (dict(f_divergence_type="kl"), "f_divergence_type"),
        (dict(loss_type="aot", use_weighting=True), "use_weighting"),
        (dict(loss_type="outcome_ce,sigmoid"), "do not mix"),
        (dict(loss_type="apo_zero_unpaired", ld_alpha=0.5), "ld_alpha is a pairwise option"),
        (dict(loss_type="outcome_ce", sft_weight=0.1), "sft_weight is a pairwise option"),
        (dict(loss_type="outcome_ce", desirable_weight=-1.0), "desirable_weight"),
    ],
)
def test_bad_loss_config_one_clear_line(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        LossConfig(**kwargs)
    assert "\n" not in str(e.value)


_SYNTHETIC = pathlib.Path(__file__).resolve().parents[1] / "dpoq_jax" / "configs" / "synthetic.py"
_SFT_CONFIG = f"{_SYNTHETIC}:error_injection:sft"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["--config.loss.loss_type=sigmoid,kto"],
            r"^config key 'loss.loss_type' must be one of .*unknown \['kto'\]",
        ),
        (
            ["--config.loss.loss_type=sigmoid,sft", "--config.loss.loss_weights=1.0"],
            r"^config key 'loss.loss_weights' has 1 weights for the 2 types",
        ),
        (["--config.loss.ld_alpha=1.5"], r"^config key 'loss.ld_alpha' must be in \[0, 1\], got 1.5"),
        (["--config.loss.ld_alpha=-0.5"], r"^config key 'loss.ld_alpha' must be in \[0, 1\]"),
        (
            ["--config.stage=dpo", "--config.loss.loss_type=simpo", "--config.reference.mode=precomputed"],
            r"^config key 'reference.mode': loss.loss_type='simpo' is reference-free",
        ),
        (["--config.loss.loss_type=exo_pair"], r"^config key 'loss.label_smoothing' must be > 0 .*exo_pair"),
        (["--config.loss.f_divergence_type=kl"], r"^config key 'loss.f_divergence_type' must be one of"),
        (["--config.loss.loss_type=outcome_ce,sft"], r"^config group 'loss': .*do not mix with other types"),
    ],
)
def test_bad_train_config_one_clear_line(overrides, match):
    from dpoq_jax.train.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match) as e:
        load_config(_SFT_CONFIG, overrides)
    assert "\n" not in str(e.value)


def test_train_config_mixture_and_reference_free_load():
    from dpoq_jax.train.config import load_config, loss_config

    c = load_config(
        _SFT_CONFIG, ["--config.loss.loss_type=sigmoid,bco_pair,sft", "--config.loss.loss_weights=0.8,0.2,1"]
    )
    cfg = loss_config(c)
    assert cfg.types == ("sigmoid", "bco_pair", "sft") and cfg.weights == (0.8, 0.2, 1)
    c = load_config(
        _SFT_CONFIG, ["--config.stage=dpo", "--config.loss.loss_type=simpo", "--config.loss.beta=2.0"]
    )
    assert not loss_config(c).needs_reference


# ---------------------------------------------------------------------------------------------
# Train-step wiring: reference-free objectives hold and run no reference; WPO gets log Σ p²


def _first_step_reference(run, batch_M, cfg, lsq=False):
    """The loss of the first step, from the model's full logits (an independent path to the lean one)."""
    import jax.numpy as jnp
    from flax import nnx

    state = run.new_state()
    b = {k: jnp.asarray(v[0]) for k, v in batch_M.items()}
    model = nnx.merge(run.graphdef, state.params, run.rest)
    logits_XV = model(b["tokens"], b["positions"], b["segment_ids"], b["branch_ids"])
    logits_XV = logits_XV.reshape(-1, logits_XV.shape[-1])
    out = {}
    for side in ("chosen", "rejected"):
        lg = logits_XV[b[f"{side}_pred_idx"]]
        out[side] = tokenq.token_logps(lg, b[f"{side}_targets"], b[f"{side}_mask"])
        out[side + "_lsq"] = tokenq.log_sum_sq_probs(lg) * b[f"{side}_mask"] if lsq else None
    ref = (out["chosen"], out["rejected"]) if cfg.needs_reference else (None, None)  # ref = initial policy
    return losses.preference_loss(
        out["chosen"], out["rejected"], *ref, b["chosen_mask"], b["rejected_mask"], config=cfg,
        pair_mask_B=b["pair_mask"], chosen_log_sum_sq_BT=out["chosen_lsq"],
        rejected_log_sum_sq_BT=out["rejected_lsq"],
    )[0]  # fmt: skip


@pytest.mark.parametrize(
    "loss",
    [
        dict(loss_type="simpo", beta=2.0),
        pytest.param(dict(loss_type="orpo"), marks=pytest.mark.slow),
        pytest.param(dict(loss_type="sigmoid", use_weighting=True), marks=pytest.mark.slow),
    ],
    ids=["simpo", "orpo", "sigmoid+wpo"],
)
def test_train_step_wiring(loss):
    from dpoq_jax.train.config import loss_config
    from dpoq_jax.train.setup import setup

    c = tiny_config("dpo")
    c.loss.update(loss)
    run = setup(c, devices=jax.devices()[:1])
    cfg = loss_config(c)
    assert (run.shardings.ref_params is None) == (not cfg.needs_reference)
    assert (run.new_state().ref_params is None) == (not cfg.needs_reference)
    batches = local_batches(run, 3)
    state, step_losses = run_steps(run, batches)
    assert np.isfinite(step_losses).all() and len(set(step_losses.tolist())) == 3
    assert int(state.skipped) == 0
    want = _first_step_reference(run, batches[0], cfg, lsq=cfg.use_weighting)
    np.testing.assert_allclose(step_losses[0], want, rtol=2e-5)
