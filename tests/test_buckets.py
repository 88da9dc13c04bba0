"""data.buckets: each step's rows padded to the smallest listed length that holds its examples.

Checked against the unbucketed path (data.seq_len for every batch) on the same examples: the same
loss and the same gradients (padding never enters a response's log-prob), and one compiled program
per bucket that a step actually used (jax.jit's own cache, counted after the steps)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import tiny_config

from dpoq_jax.data import layouts
from dpoq_jax.data.examples import TokenizedPair, TokenizedSFT
from dpoq_jax.train import inputs
from dpoq_jax.train.config import ConfigError, validate
from dpoq_jax.train.setup import global_batch, setup


def _pair(lp, lc, lr):
    return TokenizedPair(list(range(2, 2 + lp)), [5] * (lc - 1) + [0], [6] * (lr - 1) + [0])


def test_bucket_is_the_smallest_that_holds_the_step():
    pairs = [_pair(10, 3, 5), _pair(20, 4, 2)]
    assert layouts.bucket_for(pairs, "padded", (16, 24, 32)) == 24  # 20 + max(4, 2)
    assert layouts.bucket_for(pairs, "prefix_shared", (16, 24, 32)) == 32  # 20 + 4 + 2 = 26
    assert layouts.bucket_for(pairs + [None], "padded", (32, 24)) == 24  # unsorted; dummies need nothing
    assert layouts.bucket_for(pairs, "padded", (8, 16)) == 16  # nothing holds it: the largest
    # packed: 18 + 26 tokens fit one row of 48, not of 32
    assert layouts.bucket_for(pairs, "packed", (32, 48), num_rows=1) == 48
    assert layouts.bucket_for(pairs, "packed", (32, 48), num_rows=2) == 32
    assert layouts.bucket_for([TokenizedSFT([1, 2, 3], [4, 0])], "padded", (4, 8)) == 8


def test_bucketed_micro_batches_share_one_row_length():
    cfg = tiny_config("dpo")
    cfg.data.buckets = (16, 24, 32)
    make = inputs.micro_batch_fn(cfg, 1)
    assert isinstance(make, inputs.Bucketed)
    short, long_ = _pair(6, 3, 3), _pair(17, 5, 4)
    b = inputs.stack_micro([short, long_], make, 2)
    assert b["tokens"].shape == (2, 2, 24)  # both micro-batches at the step's bucket (17 + 5 = 22)
    b = inputs.stack_micro([short, short], make, 2)
    assert b["tokens"].shape == (2, 2, 16)
    cfg.data.buckets = ()
    assert not isinstance(inputs.micro_batch_fn(cfg, 1), inputs.Bucketed)  # default: today's path


def test_bad_buckets_are_a_config_error():
    cfg = tiny_config("dpo")
    cfg.data.buckets = (16, 0)
    with pytest.raises(ConfigError, match="data.buckets"):
        validate(cfg)


def _loss_and_grads(run, batch):
    state = run.new_state()
    b = {k: jax.numpy.asarray(v[0]) for k, v in batch.items()}

    def f(p):
        return run.loss_fn(p, state.ref_params, b)[0]

    return jax.jit(jax.value_and_grad(f))(state.params)


def test_bucketed_step_equals_unbucketed_and_compiles_once_per_bucket(layout="padded"):
    cfg = tiny_config("dpo")
    cfg.data.layout = layout
    cfg.data.seq_len = 64 if layout == "prefix_shared" else 32
    cfg.train.batch_size = 4
    run = setup(cfg, devices=jax.devices()[:1])
    items = run.dataset.train
    B = cfg.train.batch_size
    plain = inputs.micro_batch_fn(cfg, B)
    cfg.data.buckets = (16, 24, 32, 48, 64)
    bucketed = inputs.micro_batch_fn(cfg, B)

    batches = [items[i * B : (i + 1) * B] for i in range(3)]
    used = {inputs.stack_micro(x, bucketed, 1)["tokens"].shape[-1] for x in batches}
    assert max(used) < cfg.data.seq_len  # the buckets do save something on this data

    # same loss and gradients on the same examples
    x = batches[0]
    full, small = inputs.stack_micro(x, plain, 1), inputs.stack_micro(x, bucketed, 1)
    assert small["tokens"].shape[-1] < full["tokens"].shape[-1]
    (l1, g1), (l2, g2) = _loss_and_grads(run, full), _loss_and_grads(run, small)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=2e-4, atol=1e-6)

    # the training step compiles once per bucket used, and only those
    b_sh = run.batch_shardings(inputs.stack_micro(x, bucketed, 1))
    step_fn, _ = run.compile(b_sh)
    state = run.new_state()
    for x in batches:
        state, m = step_fn(state, global_batch(inputs.stack_micro(x, bucketed, 1), b_sh))
        assert np.isfinite(float(m["loss"]))
    assert step_fn._cache_size() == len(used)
