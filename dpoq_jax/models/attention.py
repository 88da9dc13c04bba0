"""Attention over the layouts without an [N, S, S] mask (CONTRACTS §3).

A layout row holds segments (pairs or sequences), each laid out as [prompt][chosen][rejected]
(branch ids 0, 1, 2; SFT rows have no branches). Token i attends j iff j <= i, same non-zero
segment, and branch_ids[j] is 0 or equals branch_ids[i]. Two plain "causal within segment" calls
give exactly that, because of the order inside a segment:
- the row itself: prompt and chosen queries see, causally, only their prompt (and chosen) keys;
- the row with its chosen tokens moved out (compacted): each segment becomes [prompt][rejected],
  so rejected queries see, causally, exactly their prompt and rejected keys.
The rejected queries' outputs come from the second call. Each call is a fused kernel: TPU Pallas
splash attention with segment ids, or cuDNN's causal kernel on GPU where each row holds one segment
(right-padded: causality alone keeps padding out). `masked_attention` (XLA, explicit mask) is the
reference; the model's XLA path (the CPU default) computes the same numbers by `blocked_causal_attention`,
which never keeps N·H·S² scores for the backward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "splash_interpret")

# Mosaic (Pallas TPU) kernels cannot be partitioned by XLA: on a mesh of several devices the splash
# call runs per device inside a shard_map over rows (batch axes) and heads. The train step sets the
# mesh while it is traced (`kernel_mesh`); the model itself stays mesh-free.
_KERNEL_MESH: list[tuple] = []


@dataclasses.dataclass(frozen=True)
class Mask:
    """Who attends whom in one forward, one of three kinds:
    - plain causal rows: every field None (the fused path, no mask built);
    - a layout: `segment_ids` [N, S] (and `branch_ids`), run by the fused layout attention, which
      applies a sliding window itself (`one_segment_per_row`: rows of one right-padded segment);
    - dense: an explicit boolean [N, 1, S, T] mask (the XLA reference and decoding), with `windowed`
      the same mask under the sliding window for the layers that slide (None: no layer slides).
    Closed over inside the layer scan, never a traced argument: a plain frozen dataclass."""

    segment_ids: Array | None = None
    branch_ids: Array | None = None
    one_segment_per_row: bool = True
    dense: Array | None = None
    windowed: Array | None = None
    causal: bool = False  # dense only: the mask lies inside j <= i (the training forward's masks)

    @property
    def fused(self) -> bool:
        return self.dense is None

    def for_layer(self, local: Array) -> Mask:
        """This layer's mask (local: its traced sliding-window flag): the dense kind picks `windowed`."""
        if self.windowed is None:
            return self
        return dataclasses.replace(self, dense=jnp.where(local, self.windowed, self.dense), windowed=None)



@contextlib.contextmanager
def kernel_mesh(mesh, batch_axes: tuple[str, ...], head_axis: str | None):
    """While tracing under this context, splash calls are shard_mapped over `mesh`: rows split over
    `batch_axes`, heads over `head_axis` (when the heads divide evenly)."""
    _KERNEL_MESH.append((mesh, tuple(batch_axes), head_axis))
    try:
        yield
    finally:
        _KERNEL_MESH.pop()


def layout_mask(segment_ids: Array, branch_ids: Array | None = None) -> Array:
    """Boolean [N, 1, S, S] mask of the layout. Padding queries (segment 0) attend to themselves only,
    so no softmax row is empty (their outputs are garbage that nobody reads)."""
    S = segment_ids.shape[-1]
    i = jnp.arange(S)
    causal_SS = i[None, :] <= i[:, None]
    seg_q, seg_k = segment_ids[:, :, None], segment_ids[:, None, :]
    mask = causal_SS[None] & (seg_q == seg_k) & (seg_k != 0)
    if branch_ids is not None:
        br_q, br_k = branch_ids[:, :, None], branch_ids[:, None, :]
        mask &= (br_k == 0) | (br_k == br_q)
    mask |= jnp.eye(S, dtype=bool)[None]
    return mask[:, None]


def window_mask(q_pos: Array, k_pos: Array, window: int) -> Array:
    """[N, 1, Sq, Sk]: key within `window` - 1 positions before the query (transformers' sliding window:
    kv > q - window). Positions, not slots: right for prefix-shared rows and holes in a KV cache."""
    return (q_pos[:, None, :, None] - k_pos[:, None, None, :]) < window


def dense_attention(
    q: Array, k: Array, v: Array, mask: Array, scale: float | None = None, softcap: float | None = None
) -> Array:
    """XLA attention with an explicit boolean mask [N, 1|H, Sq, Sk]; softcap: c * tanh(s / c) on the
    scaled scores (Gemma 2), which jax.nn.dot_product_attention cannot do."""
    if softcap is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="xla")
    H, K, F = q.shape[2], k.shape[2], q.shape[3]
    if K != H:
        k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    scale = F**-0.5 if scale is None else scale
    # scores and softmax in float32 (transformers' eager path upcasts the softmax too)
    s = jnp.einsum("nqhf,nkhf->nhqk", q, k, preferred_element_type=jnp.float32) * scale
    s = softcap * jnp.tanh(s / softcap)
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("nhqk,nkhf->nqhf", p, v)


# Queries per block of blocked_causal_attention (at most MAX_BLOCKS blocks a row: longer rows get
# larger blocks, so the unrolled loop stays short).
QUERY_BLOCK = 128
MAX_BLOCKS = 16


def blocked_causal_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> Array:
    """dense_attention for queries that attend only keys at or before them, by blocks of queries.

    mask: None (plain causal rows, `window` slots back at most) or a boolean [N, 1|H, S, S] mask that
    lies inside j <= i (window already in it). Each block of queries [a, b) meets only the keys [0, b)
    (the rest are masked anyway: about half the score work of a causal row is skipped), and each
    block is rematerialised in the backward pass, so between the passes a layer keeps q, k, v and the
    output, never the N·H·S² scores and probabilities that XLA's attention keeps (4.0 of the 11.6 GB
    of XLA temporaries of a SmolLM2 padded step at 8 rows of 512). Same numbers as dense_attention:
    a masked key adds exactly 0 to its softmax row."""
    S = q.shape[1]
    if k.shape[1] != S or (mask is not None and mask.shape[-2:] != (S, S)):
        raise ValueError(f"blocked_causal_attention: square attention only, got q {q.shape}, k {k.shape}")
    block = max(QUERY_BLOCK, -(-S // MAX_BLOCKS))

    @jax.checkpoint
    def one(q_b, k_b, v_b, m_b, start):
        if m_b is None:  # causal (and windowed) by slot: query start + i, key j
            i = start + jnp.arange(q_b.shape[1])[:, None]
            j = jnp.arange(k_b.shape[1])[None, :]
            m_b = j <= i if window is None else (j <= i) & (i - j < window)
            m_b = m_b[None, None]
        return dense_attention(q_b, k_b, v_b, m_b, scale, softcap)

    outs = []
    for a in range(0, S, block):
        b = min(a + block, S)
        m_b = None if mask is None else mask[:, :, a:b, :b]
        lo = 0 if window is None or mask is not None else max(0, a - window + 1)  # keys a window reaches
        if lo:  # shift the block's slot numbers with the keys it keeps
            outs.append(one(q[:, a:b], k[:, lo:b], v[:, lo:b], None, a - lo))
        else:
            outs.append(one(q[:, a:b], k[:, :b], v[:, :b], m_b, a))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def masked_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    branch_ids: Array | None,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> Array:
    """Reference: XLA attention with the explicit layout mask (N·H·S² scores in memory); `window` counts
    slots (rows whose segments hold consecutive positions, as every call here does)."""
    mask = layout_mask(segment_ids, branch_ids)
    if window is not None:
        slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[-1]), segment_ids.shape)
        mask &= window_mask(slots, slots, window)
    return dense_attention(q, k, v, mask, scale, softcap)


def in_kernel_mesh() -> bool:
    return bool(_KERNEL_MESH)


def _splash(
    q: Array, k: Array, v: Array, segment_ids: Array | None, interpret: bool, opts: tuple = (None,) * 3
) -> Array:
    """Causal (within segment) attention by the TPU Pallas splash kernel; [N, S, H, F] in and out.
    opts: (scale, softcap, window) as in causal_segments."""
    H, K = q.shape[2], k.shape[2]
    if K != H:  # grouped-query attention: each query head reads its group's key/value head
        k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    if not _KERNEL_MESH or _KERNEL_MESH[-1][0].size == 1:
        return _splash_local(q, k, v, segment_ids, interpret, opts)
    from jax.sharding import PartitionSpec as P

    mesh, batch_axes, head_axis = _KERNEL_MESH[-1]
    heads = head_axis if head_axis is not None and H % mesh.shape[head_axis] == 0 else None
    x_spec, ids_spec = P(batch_axes, None, heads, None), P(batch_axes, None)
    if segment_ids is None:
        fn = lambda q, k, v: _splash_local(q, k, v, None, interpret, opts)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3, out_specs=x_spec, check_vma=False)(
            q, k, v
        )
    fn = lambda q, k, v, ids: _splash_local(q, k, v, ids, interpret, opts)  # noqa: E731
    specs = (x_spec,) * 3 + (ids_spec,)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=x_spec, check_vma=False)(
        q, k, v, segment_ids
    )


def _splash_local(
    q: Array, k: Array, v: Array, segment_ids: Array | None, interpret: bool, opts: tuple
) -> Array:
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    N, S0, H, F = q.shape
    S = -(-S0 // 128) * 128  # the kernel's blocks are multiples of 128: pad the rows at the end
    if S != S0:  # padded keys come after every real one (causal) and have segment 0: never attended
        pad = lambda x: jnp.pad(x, [(0, 0), (0, S - S0)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q, k, v = pad(q), pad(k), pad(v)
        segment_ids = None if segment_ids is None else pad(segment_ids)
    block = next(b for b in (512, 256, 128) if S % b == 0)
    sizes = sk.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    scale, softcap, window = opts
    if window is None:
        heads = [sm.CausalMask((S, S)) for _ in range(H)]
    else:  # causal and at most window - 1 slots back
        heads = [sm.LocalMask((S, S), window_size=(window - 1, 0), offset=0) for _ in range(H)]
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask(heads),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
        attn_logits_soft_cap=softcap,  # applied to the (pre-scaled) scores, as transformers does
    )
    scale = F**-0.5 if scale is None else scale  # splash does not scale the logits
    to_hsf = lambda x: jnp.swapaxes(x, 0, 1)  # [S, H, F] -> [H, S, F]  # noqa: E731

    def one(q1, k1, v1, seg1):
        ids = None if seg1 is None else sk.SegmentIds(q=seg1, kv=seg1)
        return jnp.swapaxes(kernel(to_hsf(q1 * scale), to_hsf(k1), to_hsf(v1), segment_ids=ids), 0, 1)

    if segment_ids is None:
        out = jax.vmap(lambda a, b, c: one(a, b, c, None))(q, k, v)
    else:
        out = jax.vmap(one)(q, k, v, segment_ids)
    return out[:, :S0]


def causal_segments(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array | None,
    impl: str,
    one_segment_per_row: bool,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> Array:
    """Causal attention within segments by a fused kernel (segment_ids None: one sequence per row).

    scale: of the scores (default head_dim ** -0.5); softcap: c * tanh(s / c) on the scaled scores
    (splash has it; cuDNN does not: resolve_attention sends soft-capped models to XLA); window: keys at
    most window - 1 slots back (splash LocalMask, cuDNN local_window_size)."""
    if impl in ("splash", "splash_interpret"):
        return _splash(q, k, v, segment_ids, impl == "splash_interpret", (scale, softcap, window))
    if segment_ids is None and impl != "cudnn":
        # one right-padded sequence per row: causality alone keeps every real token off the padding
        return blocked_causal_attention(q, k, v, None, scale, softcap, window)
    if softcap is None and (segment_ids is None or (impl == "cudnn" and one_segment_per_row)):
        local = None if window is None else (window - 1, 0)
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, local_window_size=local, implementation="cudnn"
        )
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    return masked_attention(q, k, v, segment_ids, None, scale, softcap, window)


def _compact_without_chosen(branch_ids: Array) -> tuple[Array, Array]:
    """(order_NS, inverse_NS): a stable permutation putting each row's chosen tokens (branch 1) last,
    and where each original position went."""
    order = jnp.argsort((branch_ids == 1).astype(jnp.int32), axis=-1, stable=True)
    inverse = jnp.argsort(order, axis=-1)
    return order, inverse


def layout_attention(
    q: Array,
    k: Array,
    v: Array,
    segment_ids: Array,
    branch_ids: Array | None,
    impl: str,
    one_segment_per_row: bool = False,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> Array:
    """Attention of a layout row [N, S, H, F] by two fused causal-within-segment calls (module doc).
    segment_ids None: plain causal rows. A sliding window counts slots, which is exact here: each
    call's segments hold consecutive positions (the compaction removes the chosen tokens)."""
    opts = (scale, softcap, window)
    out = causal_segments(q, k, v, segment_ids, impl, one_segment_per_row, *opts)
    if branch_ids is None:
        return out
    order, inverse = _compact_without_chosen(branch_ids)
    take = functools.partial(jnp.take_along_axis, axis=1)
    seg_c = jnp.where(take(branch_ids, order) == 1, 0, take(segment_ids, order))  # chosen -> padding
    idx = order[:, :, None, None]
    out_c = causal_segments(take(q, idx), take(k, idx), take(v, idx), seg_c, impl, one_segment_per_row, *opts)
    out_rej = take(out_c, inverse[:, :, None, None])
    return jnp.where((branch_ids == 2)[:, :, None, None], out_rej, out)
