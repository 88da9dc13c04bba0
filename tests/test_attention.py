"""Fused layout attention (models/attention.py): each kernel path equals the masked XLA reference in
outputs and gradients on rows of uneven segments, and the whole DPO/SFT step on every layout equals
the padded one with the fused path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax.models import attention as A
from dpoq_jax.train import inputs
from dpoq_jax.train.config import synthetic_config
from dpoq_jax.train.setup import forward_for, setup
from dpoq_jax.train.step import accumulate_grads, layout_logps


def _rows(branches: bool) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of S=128: row 0 holds two groups of uneven lengths, row 1 one group then padding.
    A group is [prompt][chosen][rejected] (branches) or one sequence (SFT rows)."""
    S = 128
    seg, br = np.zeros((2, S), np.int32), np.zeros((2, S), np.int32)

    def put(n, s, lp, lc, lr, sid):
        seg[n, s : s + lp + lc + lr] = sid
        if branches:
            br[n, s + lp : s + lp + lc] = 1
            br[n, s + lp + lc : s + lp + lc + lr] = 2
        return s + lp + lc + lr

    end = put(0, 0, 20, 7, 13, 1)  # (row, start, prompt, chosen, rejected, segment id)
    put(0, end, 31, 5, 9, 2)
    put(1, 0, 50, 30, 17, 1)
    return seg, br


@pytest.mark.parametrize("impl", ["xla", "splash_interpret"])
@pytest.mark.parametrize("branches", [True, False])
@pytest.mark.parametrize("kv_heads", [2, 1])
def test_kernel_paths_equal_masked_attention(impl, branches, kv_heads):
    seg, br = _rows(branches)
    seg, br = jnp.asarray(seg), (jnp.asarray(br) if branches else None)
    rng = np.random.default_rng(0)
    N, S, H, F = 2, 128, 2, 32
    q = jnp.asarray(rng.normal(size=(N, S, H, F)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(N, S, kv_heads, F)), jnp.float32) for _ in range(2))
    real = (seg > 0)[:, :, None, None]  # padding queries' outputs are read by nobody
    w = jnp.asarray(rng.normal(size=(N, S, H, F)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.where(real, fn(q, k, v), 0.0) * w)

    ref = lambda q, k, v: A.masked_attention(q, k, v, seg, br)  # noqa: E731
    fused = lambda q, k, v: A.layout_attention(q, k, v, seg, br, impl)  # noqa: E731
    np.testing.assert_allclose(
        np.where(real, fused(q, k, v), 0), np.where(real, ref(q, k, v), 0), atol=2e-5, rtol=0
    )
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
    for a, b, name in zip(got, want, "qkv", strict=True):
        assert float(jnp.abs(b).max()) > 0
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=0, err_msg=f"d{name}")


def _positions(seg: np.ndarray, br: np.ndarray) -> np.ndarray:
    """Position ids of _rows(branches=True): each group counts from 0; rejected continues the prompt."""
    pos = np.zeros_like(seg)
    for n in range(seg.shape[0]):
        count, prompt_end = 0, 0
        for s in range(seg.shape[1]):
            if s and (seg[n, s] != seg[n, s - 1]):
                count, prompt_end = 0, 0
            if br[n, s] == 0:
                prompt_end = count + 1
            if br[n, s] == 2 and br[n, s - 1] != 2:
                count = prompt_end
            pos[n, s] = count
            count += 1
    return pos


def test_splash_window_softcap_scale_equal_position_masked_reference():
    """Gemma's options on the fused path: a sliding window (slots in each compacted call), score
    soft-capping and a custom scale equal the XLA reference whose window counts positions (forward)."""
    seg, br = _rows(True)
    pos = jnp.asarray(_positions(seg, br))
    seg, br = jnp.asarray(seg), jnp.asarray(br)
    rng = np.random.default_rng(2)
    N, S, H, F = 2, 128, 2, 16
    q = jnp.asarray(rng.normal(size=(N, S, H, F)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(N, S, 1, F)), jnp.float32) for _ in range(2))
    real = (seg > 0)[:, :, None, None]
    opts = dict(scale=0.4, softcap=2.0, window=6)
    mask = A.layout_mask(seg, br) & A.window_mask(pos, pos, opts["window"])
    ref = lambda q, k, v: A.dense_attention(q, k, v, mask, opts["scale"], opts["softcap"])  # noqa: E731
    fused = lambda q, k, v: A.layout_attention(q, k, v, seg, br, "splash_interpret", **opts)  # noqa: E731
    np.testing.assert_allclose(np.where(real, fused(q, k, v), 0), np.where(real, ref(q, k, v), 0), atol=2e-5)
    no_window = A.dense_attention(q, k, v, A.layout_mask(seg, br), opts["scale"], opts["softcap"])
    assert float(jnp.abs(jnp.where(real, no_window - ref(q, k, v), 0)).max()) > 0.1  # the window bites
    # (gradients: the splash kernel's own; interpreted on CPU they cost ~30 s, left to the TPU runs)


def test_local_window_size_is_the_position_window_and_cudnn_skips_softcap():
    """jax.nn's local_window_size=(window - 1, 0), which the cuDNN call passes (run here on XLA, the same
    arguments; no GPU in CI), is transformers' window; soft-capped models never take cuDNN."""
    from dpoq_jax.models.layers import resolve_attention

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.float32) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    mask = A.layout_mask(jnp.ones((2, 16), jnp.int32)) & A.window_mask(pos, pos, 4)
    got = A.causal_segments(q, k, v, None, "xla", True, scale=0.3, window=4)
    np.testing.assert_allclose(got, A.dense_attention(q, k, v, mask, 0.3), atol=1e-6, rtol=0)
    assert resolve_attention("cudnn", jnp.bfloat16, softcap=50.0) == "xla"
    assert resolve_attention("cudnn", jnp.bfloat16) == "cudnn"


def test_splash_plain_causal_rows_equal_xla():
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 32)), jnp.float32) for _ in range(3))
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    got = A.causal_segments(q, k, v, None, "splash_interpret", True)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _config(stage: str, layout: str, attention: str):
    c = synthetic_config("error_injection", stage)
    c.model.init = "random"
    c.model.path = ""
    c.model.config.update(
        {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 8,
         "intermediate_size": 64, "rotary_dim": 8}
    )  # fmt: skip
    c.data.num_examples = 16
    c.data.num_eval = 4
    c.data.seq_len = 64
    c.data.response_len = 12
    c.data.layout = layout
    c.model.attention = attention
    c.train.batch_size = 4
    c.mesh.update({"data": 1, "fsdp": 1, "tensor": 1})
    return c


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo"])  # SFT rows (segments, no branches): kernel test above
def test_step_on_every_layout_with_the_fused_kernel_equals_padded(stage):
    """Log-probs, loss and gradients of the whole step: prefix_shared and packed with the Pallas kernel
    (interpreted on CPU) equal padded with the XLA reference."""
    out = {}
    cases = (("padded", "xla"), ("prefix_shared", "splash_interpret"), ("packed", "splash_interpret"))
    for layout, attention in cases:
        cfg = _config(stage, layout, attention)
        run = setup(cfg, devices=jax.devices()[:1])
        state = run.new_state()
        items = run.dataset.train[:4]
        batch = inputs.stack_micro(items, inputs.micro_batch_fn(cfg, 4), 1)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        grads, metrics = jax.jit(lambda p, r, b, run=run: accumulate_grads(run.loss_fn, p, r, b))(
            state.params, state.ref_params, batch
        )
        logps = None
        if stage == "dpo":
            micro = {k: v[0] for k, v in batch.items()}
            logps = layout_logps(run.graphdef, run.rest, state.params, micro, forward_for(cfg, 4))
        out[layout] = (grads, metrics, logps)
    grads0, metrics0, logps0 = out["padded"]
    assert float(metrics0["loss"]) > 0
    for layout in ("prefix_shared", "packed"):
        grads, metrics, logps = out[layout]
        np.testing.assert_allclose(float(metrics["loss"]), float(metrics0["loss"]), rtol=1e-5, err_msg=layout)
        if logps is not None:
            for a, b in zip(logps, logps0, strict=True):
                np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=f"{layout} log-probs")
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4, err_msg=f"{layout} gradients")
