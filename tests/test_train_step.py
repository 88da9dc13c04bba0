"""Train step: sharded == single device, accumulation == one big batch, NaN guard, optimizer schedule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import local_batches, run_steps, tiny_config

from dpoq_jax.train.config import ConfigError, base_config
from dpoq_jax.train.mesh import DEFAULT_RULES, make_mesh, mesh_shape, rules_from_config
from dpoq_jax.train.optim import make_optimizer, make_schedule
from dpoq_jax.train.setup import forward_for, global_batch, setup
from dpoq_jax.train.step import accumulate_grads


def test_logps_chunk_counts_time_steps():
    """train.logps_chunk is time steps per chunk (README, Training); lean_token_logps takes positions, so
    the loop scales it by the responses of one micro-batch (it used to pass 32 positions = 1 step)."""
    c = tiny_config("dpo")
    c.train.logps_chunk = 32
    assert forward_for(c, 16).chunk_size == 32 * 16
    c.train.logps_chunk = 0
    assert forward_for(c, 16).chunk_size == 16  # at least one step per chunk


def test_mesh_shape_and_rules():
    assert mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    with pytest.raises(ValueError, match="needs 6 devices"):
        mesh_shape({"data": 3, "fsdp": 2, "tensor": 1}, 8)
    with pytest.raises(ValueError, match="at most one axis"):
        mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
    assert rules_from_config(()) == DEFAULT_RULES
    assert rules_from_config([["embed", ["data", "fsdp"]]]) == (("embed", ("data", "fsdp")),)
    with pytest.raises(ValueError, match="unknown mesh axes"):
        rules_from_config([["embed", "model"]])
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


def test_sharded_dpo_steps_equal_single_device():
    """Five DPO steps on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices == one device (f32, 1e-5)."""
    assert jax.device_count() == 8
    run8 = setup(tiny_config("dpo", data=2, fsdp=2, tensor=2))
    run1 = setup(tiny_config("dpo"), devices=jax.devices()[:1])
    batches = local_batches(run1, 5)
    state8, losses8 = run_steps(run8, batches)
    state1, losses1 = run_steps(run1, batches)
    # parameters really are split over fsdp and tensor axes
    specs = {str(x.sharding.spec) for x in jax.tree.leaves(state8.params)}
    assert any("fsdp" in s for s in specs) and any("tensor" in s for s in specs)
    assert len(set(losses1.tolist())) == 5  # the parameters move
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(state8.params), jax.tree.leaves(state1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    assert int(state8.step) == 5 and int(state8.skipped) == 0


def test_accumulation_equals_one_batch_and_nan_guard():
    """4 micro-batches give the gradient of the whole batch; a NaN batch leaves the state untouched."""
    run = setup(tiny_config("dpo"), devices=jax.devices()[:1])
    state = run.new_state()
    (whole,) = local_batches(run, 1, micro=1)
    (split,) = local_batches(run, 1, micro=4)
    g1, m1 = jax.jit(lambda p, r, b: accumulate_grads(run.loss_fn, p, r, b))(
        state.params, state.ref_params, whole
    )
    g4, m4 = jax.jit(lambda p, r, b: accumulate_grads(run.loss_fn, p, r, b))(
        state.params, state.ref_params, split
    )
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)

    b_sh = run.batch_shardings(whole)
    step_fn, _ = run.compile(b_sh)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    bad = dict(whole, chosen_mask=np.where(whole["chosen_mask"] > 0, np.nan, 0.0).astype(np.float32))
    state, m = step_fn(state, global_batch(bad, b_sh))
    assert not bool(m["finite"]) and int(state.skipped) == 1 and int(state.nonfinite_streak) == 1
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    state, m = step_fn(state, global_batch(whole, b_sh))
    assert bool(m["finite"]) and int(state.skipped) == 1 and int(state.nonfinite_streak) == 0
    assert int(state.step) == 2


def test_schedule_and_optimizers():
    s = make_schedule(1.0, warmup_steps=4, total_steps=14, schedule="linear", end_factor=0.0)
    np.testing.assert_allclose([float(s(i)) for i in (0, 3, 4, 9, 14)], [0.2, 0.8, 1.0, 0.5, 0.0], atol=1e-6)
    c = make_schedule(2.0, warmup_steps=0, total_steps=10, schedule="cosine", end_factor=0.5)
    np.testing.assert_allclose([float(c(0)), float(c(10))], [2.0, 1.0], atol=1e-6)
    k = make_schedule(3.0, warmup_steps=2, total_steps=10, schedule="constant")
    np.testing.assert_allclose([float(k(0)), float(k(5))], [1.0, 3.0], atol=1e-6)

    cfg = base_config().optim
    cfg.lr, cfg.warmup_steps, cfg.clip_norm = 0.1, 0, 1.0
    params = {"w": jnp.array([3.0, 4.0])}
    grads = {"w": jnp.array([30.0, 40.0])}  # norm 50 -> clipped to norm 1
    for name in ("rmsprop", "adamw"):
        cfg.name = name
        opt, _ = make_optimizer(cfg, 10)
        updates, _ = opt.update(grads, opt.init(params), params)
        if name == "rmsprop":  # torch RMSprop: lr * g / (sqrt(v) + eps), v = (1 - decay) g^2
            g = np.array([0.6, 0.8])
            expect = -0.1 * g / (np.sqrt((1 - cfg.decay) * g**2) + cfg.eps)
        else:  # first Adam step: -lr * sign(g) (bias-corrected), no weight decay here
            expect = -0.1 * np.ones(2)
        np.testing.assert_allclose(np.asarray(updates["w"]), expect, rtol=1e-5)
    cfg.name = "sgd"
    with pytest.raises(ValueError, match="optim.name"):
        make_optimizer(cfg, 10)
    assert isinstance(ConfigError("x"), ValueError)
    assert optax.tree.norm(grads) == 50.0
    assert nnx is not None


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_under_micro_batch_scan_equals_no_remat(remat):
    """Rematerialised scanned layers inside the micro-batch scan (with a frozen reference): same
    gradients as without remat. nnx.remat failed here with a TraceContextError before the layer scan."""
    cfg = tiny_config("dpo")
    cfg.model.config.num_layers = 3
    grads = {}
    for policy in ("none", remat):
        cfg.model.remat = policy
        run = setup(cfg, devices=jax.devices()[:1])
        state = run.new_state()
        (split,) = local_batches(run, 1, micro=2)
        grads[policy], _ = jax.jit(lambda p, r, b, run=run: accumulate_grads(run.loss_fn, p, r, b))(
            state.params, state.ref_params, split
        )
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_a_batch_that_does_not_split_over_the_devices_is_one_clear_line():
    c = tiny_config("dpo", data=-1)  # the tests' 8 CPU devices on the data axis
    c.train.batch_size = 4
    with pytest.raises(ValueError, match=r"^config key 'train.batch_size': 4 examples per micro-batch .* "
                       r"do not split over the 8 data-parallel devices"):  # fmt: skip
        setup(c)
    c.train.batch_size, c.data.layout, c.data.num_rows = 8, "packed", 4
    with pytest.raises(ValueError, match=r"^config key 'data.num_rows': 4 packed rows do not split"):
        setup(c)


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_step_equals_the_dense_kl_on_every_layout(variant):
    """loss_type tdpo in the real step: the loss equals losses.preference_loss fed with the per-token
    KL(π_ref‖π) computed from the full logits of both models (tokenq.token_kl), and padded,
    prefix-shared and packed rows give the same loss and gradients (float32)."""
    from dpoq_jax import losses, tokenq
    from dpoq_jax.train.step import PAIR

    out = {}
    for layout in ("padded", "prefix_shared", "packed"):
        cfg = tiny_config()
        cfg.data.layout, cfg.data.seq_len = layout, 64
        cfg.loss.loss_type, cfg.loss.tdpo_variant, cfg.loss.tdpo_alpha = "tdpo", variant, 0.7
        run = setup(cfg, devices=jax.devices()[:1])
        state = run.new_state()
        noise = jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(1), x.shape), state.params)
        params = jax.tree.map(jnp.add, state.params, noise)  # a policy that differs from the reference
        (batch,) = local_batches(run, 1)
        micro = {k: jnp.asarray(v[0]) for k, v in batch.items()}
        (loss, (_, metrics)), grads = jax.value_and_grad(run.loss_fn, has_aux=True)(
            params, state.ref_params, micro
        )
        out[layout] = (float(loss), grads)
        if layout == "padded":  # the dense reference: full logits of both models at every position
            def logps_and_logits(p, run=run, micro=micro):
                model = nnx.merge(run.graphdef, p, run.rest)
                logits = model(micro["tokens"], micro["positions"])
                N, S, V = logits.shape
                return logits.reshape(N * S, V)

            lp, lr = logps_and_logits(params), logps_and_logits(state.ref_params)
            vals = {}
            for side in PAIR:
                idx, tgt, mask = (micro[f"{side}_{k}"] for k in ("pred_idx", "targets", "mask"))
                lp_PRV, lr_PRV = lp[idx], lr[idx]
                vals[side] = (
                    jnp.take_along_axis(jax.nn.log_softmax(lp_PRV), tgt[..., None], -1)[..., 0],
                    jnp.take_along_axis(jax.nn.log_softmax(lr_PRV), tgt[..., None], -1)[..., 0],
                    tokenq.token_kl(lp_PRV, lr_PRV, mask),
                )
            (pc, rc, kc), (pr, rr, kr) = vals["chosen"], vals["rejected"]
            want, _ = losses.preference_loss(
                pc, pr, rc, rr, micro["chosen_mask"], micro["rejected_mask"],
                config=losses.LossConfig(beta=0.1, loss_type="tdpo", tdpo_variant=variant, tdpo_alpha=0.7),
                pair_mask_B=micro["pair_mask"], kl_chosen_BT=kc, kl_rejected_BT=kr,
            )  # fmt: skip
            assert float(jnp.sum(kc * micro["chosen_mask"])) > 1e-3  # the KL is not zero here
            np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
    loss0, grads0 = out["padded"]
    for layout in ("prefix_shared", "packed"):
        loss, grads = out[layout]
        np.testing.assert_allclose(loss, loss0, rtol=1e-5, err_msg=layout)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=layout)
