"""Fused layout attention (models/attention.py): each kernel path equals the masked XLA reference in
outputs and gradients on rows of uneven segments, and the whole DPO/SFT step on every layout equals
the padded one with the fused path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpoq_jax.configs.synthetic import synthetic_config
from dpoq_jax.models import attention as A
from dpoq_jax.train import inputs
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


# ---- the XLA path by query blocks (blocked_causal_attention): same numbers, no S² kept ------------


def _unblocked(q, k, v, mask=None, scale=None, softcap=None, window=None):
    """The XLA path as it was before query blocks: jax.nn's causal call for plain rows, the explicit
    mask otherwise (scores and probabilities of every row kept for the backward pass)."""
    if mask is None and softcap is None:
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="xla"
        )
    if mask is None:
        S = q.shape[1]
        mask = A.layout_mask(jnp.ones(q.shape[:2], jnp.int32))
        if window is not None:
            pos = jnp.broadcast_to(jnp.arange(S), q.shape[:2])
            mask &= A.window_mask(pos, pos, window)
    return A.dense_attention(q, k, v, mask, scale, softcap)


@pytest.mark.parametrize(
    "S,masked,softcap,window",
    [(37, False, None, None), (64, False, None, 5), (50, False, 20.0, None), (45, True, None, None),
     (45, True, 30.0, None), (16, False, None, None)],
)  # fmt: skip
def test_blocked_causal_attention_equals_unblocked(monkeypatch, S, masked, softcap, window):
    """Outputs and gradients (q, k, v) of the query-block path equal the unblocked XLA path, with
    blocks that do not divide the row, a sliding window (keys trimmed per block), soft-capping and a
    layout mask (segments and branches)."""
    monkeypatch.setattr(A, "QUERY_BLOCK", 8)
    rng = np.random.default_rng(S)
    N, H, K, F = 2, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(N, S, H, F)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(N, S, K, F)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=(N, S, H, F)), jnp.float32)
    mask = None
    if masked:
        seg = np.zeros((N, S), np.int32)
        br = np.zeros((N, S), np.int32)
        seg[0, :20], br[0, 8:14], br[0, 14:20] = 1, 1, 2
        seg[0, 20:41], br[0, 30:35], br[0, 35:41] = 2, 1, 2
        seg[1, :33], br[1, 10:20], br[1, 20:33] = 1, 1, 2
        mask = A.layout_mask(jnp.asarray(seg), jnp.asarray(br))

    def loss(fn):
        return lambda q, k, v: jnp.sum(w * fn(q, k, v, mask, 0.3, softcap, window))

    # jitted (traced with the patched QUERY_BLOCK): op by op, the block loop and its gradient took seconds
    got = jax.jit(lambda q, k, v: A.blocked_causal_attention(q, k, v, mask, 0.3, softcap, window))(q, k, v)
    want = jax.jit(lambda q, k, v: _unblocked(q, k, v, mask, 0.3, softcap, window))(q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    g_got = jax.jit(jax.grad(loss(A.blocked_causal_attention), argnums=(0, 1, 2)))(q, k, v)
    g_want = jax.jit(jax.grad(loss(_unblocked), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["padded", "prefix_shared"])
def test_dpo_step_with_query_blocks_equals_the_step_before(monkeypatch, layout):
    """The whole DPO step on a tiny model (float32): loss and gradients with the query-block attention
    (blocks of 8 in rows of 64) equal those of the unblocked XLA attention the step used before."""

    def loss_and_grads():
        cfg = _config("dpo", layout, "xla")
        run = setup(cfg, devices=jax.devices()[:1])
        state = run.new_state()
        batch = inputs.stack_micro(run.dataset.train[:4], inputs.micro_batch_fn(cfg, 4), 1)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
        return jax.jit(lambda p, r, b: accumulate_grads(run.loss_fn, p, r, b))(
            state.params, state.ref_params, batch
        )

    monkeypatch.setattr(A, "QUERY_BLOCK", 8)
    grads, metrics = loss_and_grads()
    monkeypatch.setattr(A, "blocked_causal_attention", _unblocked)
    grads0, metrics0 = loss_and_grads()
    assert float(metrics0["loss"]) > 0
    np.testing.assert_allclose(float(metrics["loss"]), float(metrics0["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_query_blocks_keep_no_scores_for_the_backward_pass():
    """XLA's compiled memory of the value and gradient of 8 attention layers under a lax.scan (as the
    model runs its layers), N=4, H=8, S=512: the unblocked path keeps each layer's N·H·S² float32
    scores (32 MiB a layer) for the backward pass, the blocked one only q, k, v and the outputs."""
    N, S, H, F, L = 4, 512, 8, 16, 8
    x = jax.ShapeDtypeStruct((N, S, H, F), jnp.float32)
    w = jax.ShapeDtypeStruct((L, F, F), jnp.float32)

    def temp_bytes(attend):
        def layers(x, w_L):
            body = lambda x, w: (attend(x @ w, x, x), None)  # noqa: E731
            return jnp.sum(jax.lax.scan(body, x, w_L)[0] ** 2)

        g = jax.jit(jax.grad(layers, argnums=(0, 1)))
        return g.lower(x, w).compile().memory_analysis().temp_size_in_bytes

    blocked = temp_bytes(lambda q, k, v: A.blocked_causal_attention(q, k, v))
    unblocked = temp_bytes(lambda q, k, v: _unblocked(q, k, v))
    assert unblocked >= L * N * H * S * S * 4  # every layer's scores
    assert blocked < 0.25 * unblocked, (blocked, unblocked)
