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
reference and the CPU default.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "splash_interpret")

# Mosaic (Pallas TPU) kernels cannot be partitioned by XLA: on a mesh of several devices the splash
# call runs per device inside a shard_map over rows (batch axes) and heads. The train step sets the
# mesh while it is traced (`kernel_mesh`); the model itself stays mesh-free.
_KERNEL_MESH: list[tuple] = []


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


def masked_attention(q: Array, k: Array, v: Array, segment_ids: Array, branch_ids: Array | None) -> Array:
    """Reference: XLA attention with the explicit layout mask (N·H·S² scores in memory)."""
    mask = layout_mask(segment_ids, branch_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def in_kernel_mesh() -> bool:
    return bool(_KERNEL_MESH)


def _splash(q: Array, k: Array, v: Array, segment_ids: Array | None, interpret: bool) -> Array:
    """Causal (within segment) attention by the TPU Pallas splash kernel; [N, S, H, F] in and out."""
    H, K = q.shape[2], k.shape[2]
    if K != H:  # grouped-query attention: each query head reads its group's key/value head
        k, v = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
    if not _KERNEL_MESH or _KERNEL_MESH[-1][0].size == 1:
        return _splash_local(q, k, v, segment_ids, interpret)
    from jax.sharding import PartitionSpec as P

    mesh, batch_axes, head_axis = _KERNEL_MESH[-1]
    heads = head_axis if head_axis is not None and H % mesh.shape[head_axis] == 0 else None
    x_spec, ids_spec = P(batch_axes, None, heads, None), P(batch_axes, None)
    if segment_ids is None:
        fn = lambda q, k, v: _splash_local(q, k, v, None, interpret)  # noqa: E731
        return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec,) * 3, out_specs=x_spec, check_vma=False)(
            q, k, v
        )
    fn = lambda q, k, v, ids: _splash_local(q, k, v, ids, interpret)  # noqa: E731
    specs = (x_spec,) * 3 + (ids_spec,)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=x_spec, check_vma=False)(
        q, k, v, segment_ids
    )


def _splash_local(q: Array, k: Array, v: Array, segment_ids: Array | None, interpret: bool) -> Array:
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
    mask = sm.MultiHeadMask([sm.CausalMask((S, S)) for _ in range(H)])
    kernel = sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    scale = 1.0 / (F**0.5)  # splash does not scale the logits
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
    q: Array, k: Array, v: Array, segment_ids: Array | None, impl: str, one_segment_per_row: bool
) -> Array:
    """Causal attention within segments by a fused kernel (segment_ids None: one sequence per row)."""
    if impl in ("splash", "splash_interpret"):
        return _splash(q, k, v, segment_ids, interpret=impl == "splash_interpret")
    if impl == "cudnn" and (segment_ids is None or one_segment_per_row):
        # one right-padded sequence per row: causality alone keeps every real token off the padding
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    return masked_attention(q, k, v, segment_ids, None)


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
) -> Array:
    """Attention of a layout row [N, S, H, F] by two fused causal-within-segment calls (module doc)."""
    out = causal_segments(q, k, v, segment_ids, impl, one_segment_per_row)
    if branch_ids is None:
        return out
    order, inverse = _compact_without_chosen(branch_ids)
    take = functools.partial(jnp.take_along_axis, axis=1)
    seg_c = jnp.where(take(branch_ids, order) == 1, 0, take(segment_ids, order))  # chosen -> padding
    idx = order[:, :, None, None]
    out_c = causal_segments(take(q, idx), take(k, idx), take(v, idx), seg_c, impl, one_segment_per_row)
    out_rej = take(out_c, inverse[:, :, None, None])
    return jnp.where((branch_ids == 2)[:, :, None, None], out_rej, out)
