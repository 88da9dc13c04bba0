"""dpoq_jax.losses against float64 numpy references; masking, dummy pairs, devices."""

import functools

import chex
import jax
import numpy as np
import pytest
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
