"""One Flax NNX decoder for GPT-NeoX/Pythia, Llama/Mistral, Qwen2 and GPT-2 (see ModelConfig.family).

Shapes: N rows (or B), S tokens per row (T new tokens when decoding), D width, H query heads,
K key/value heads, F head dim, M MLP width, V vocabulary, L layers. The layers' parameters are
stacked on a leading L axis (`Decoder.blocks` is one Block holding all of them) and run by a
lax.scan, so a model compiles one layer body however deep it is. Attention layout (CONTRACTS §3): token i
attends token j iff j <= i in row order, segment_ids equal and non-zero, and branch_ids[j] is 0 or
equals branch_ids[i]. segment_ids=None means plain causal attention over the whole row.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax.models import attention as attn_lib
from dpoq_jax.models.attention import layout_mask as attention_mask  # noqa: F401 (public name)
from dpoq_jax.models.config import ModelConfig

Array = jax.Array
Cache = dict[str, Any]

_INIT_STD = 0.02


def default_dtype() -> jnp.dtype:
    """Compute dtype: bfloat16 on accelerators, float32 on CPU."""
    return jnp.dtype(jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)


_EAGER_BUCKET_MAX = 1 << 22  # eager init draws parameters up to this size through shared buckets


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal_bucket(key: Array, size: int, dtype: Any) -> Array:
    return _INIT_STD * jax.random.normal(key, (size,), dtype)


def _normal(key: Array, shape: tuple[int, ...], dtype: Any) -> Array:
    """_INIT_STD * N(0, 1) of `shape`, bitwise equal to `_INIT_STD * jax.random.normal(key, shape)`.

    Built eagerly (outside jit/eval_shape), every distinct shape would compile its own threefry
    program (~0.3-0.8 s each on CPU: seconds per model). With the partitionable threefry (the JAX
    default) element i depends only on (key, flat index i), so eagerly we draw a power-of-two bucket
    (one compiled program per bucket size, shared by all shapes) and cut it on the host. Under a
    trace, or for big parameters, the direct draw keeps sharding and memory as they are.
    """
    size = math.prod(shape)
    partitionable = getattr(jax.config, "jax_threefry_partitionable", False)
    tracer = getattr(jax.core, "Tracer", None)  # if a JAX version lacks either, take the direct draw
    if size > _EAGER_BUCKET_MAX or not partitionable or tracer is None or isinstance(key, tracer):
        return _INIT_STD * jax.random.normal(key, shape, dtype)
    bucket = max(1024, 1 << (size - 1).bit_length())
    return jnp.asarray(np.asarray(_normal_bucket(key, bucket, jnp.dtype(dtype)))[:size].reshape(shape))


def _param(
    rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str | None, ...], dtype, init: str
) -> nnx.Param:
    """A parameter with logical axis names. eager_sharding=False: the model can be built without a mesh;
    placement on a mesh comes from `sharding.logical_to_shardings` (jit out_shardings or load_hf)."""
    if init == "normal":
        value = _normal(rngs.params(), shape, dtype)
    else:  # numpy constants: no per-shape compilation when built eagerly
        value = jnp.asarray(np.full(shape, 1 if init == "ones" else 0, jnp.dtype(dtype)))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# ----------------------------------------------------------------------------------------------
# Attention layout and rotary embeddings (pure functions)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float32), with linear or Llama-3 scaling."""
    r = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, r, 2, dtype=np.float32) / r))
    p = dict(cfg.rope_scaling)
    if cfg.rope_type == "linear":
        inv = inv / p["factor"]
    elif cfg.rope_type == "llama3":
        factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old_ctx = p["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray) -> tuple[Array, Array]:
    """cos, sin [N, S, 1, rotary_dim] (float32) for the given position ids."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_NSHF: Array, cos: Array, sin: Array) -> Array:
    """Rotate the first rotary_dim dims of each head (half-split convention of GPT-NeoX/Llama)."""
    r = cos.shape[-1]
    x_rot, x_pass = x_NSHF[..., :r].astype(jnp.float32), x_NSHF[..., r:]
    x1, x2 = x_rot[..., : r // 2], x_rot[..., r // 2 :]
    rotated = x_rot * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
    return jnp.concatenate([rotated.astype(x_NSHF.dtype), x_pass], axis=-1)


# ----------------------------------------------------------------------------------------------
# Layers


class Norm(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype):
        self.rms = cfg.norm == "rmsnorm"
        self.eps = cfg.norm_eps
        self.dtype = dtype
        self.scale = _param(None, (cfg.hidden_size,), ("embed",), param_dtype, "ones")
        self.bias = None if self.rms else _param(None, (cfg.hidden_size,), ("embed",), param_dtype, "zeros")

    def __call__(self, x: Array) -> Array:
        # Statistics in float32: bfloat16 means/variances over D lose several digits.
        x = x.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, dtype, implementation: str):
        D, H, K, F = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.dtype = dtype
        self.implementation = implementation
        self.wq = _param(rngs, (D, H, F), ("embed", "heads", "head_dim"), param_dtype, "normal")
        self.wk = _param(rngs, (D, K, F), ("embed", "kv_heads", "head_dim"), param_dtype, "normal")
        self.wv = _param(rngs, (D, K, F), ("embed", "kv_heads", "head_dim"), param_dtype, "normal")
        self.wo = _param(rngs, (H, F, D), ("heads", "head_dim", "embed"), param_dtype, "normal")
        if cfg.qkv_bias:
            self.bq = _param(None, (H, F), ("heads", "head_dim"), param_dtype, "zeros")
            self.bk = _param(None, (K, F), ("kv_heads", "head_dim"), param_dtype, "zeros")
            self.bv = _param(None, (K, F), ("kv_heads", "head_dim"), param_dtype, "zeros")
        else:
            self.bq = self.bk = self.bv = None
        self.bo = _param(None, (D,), ("embed",), param_dtype, "zeros") if cfg.out_bias else None

    def _proj(self, x: Array, w: nnx.Param, b: nnx.Param | None) -> Array:
        y = jnp.einsum("nsd,dhf->nshf", x, w[...].astype(self.dtype))
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(
        self,
        x_NSD: Array,
        rope: tuple[Array, Array] | None,
        mask: Array | None,
        kv: tuple[Array, Array] | None = None,
        index: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        q = self._proj(x_NSD, self.wq, self.bq)
        k = self._proj(x_NSD, self.wk, self.bk)
        v = self._proj(x_NSD, self.wv, self.bv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:  # decoding: write the new keys/values at `index`, attend over the cache
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            kv = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        out = _attend(q, k, v, mask, resolve_attention(self.implementation, self.dtype))
        y = jnp.einsum("nshf,hfd->nsd", out, self.wo[...].astype(self.dtype))
        if self.bo is not None:
            y = y + self.bo[...].astype(self.dtype)
        return y, kv


def _attend(q: Array, k: Array, v: Array, layout: Any, implementation: str) -> Array:
    """layout None: plain causal rows; an array: an explicit boolean mask (XLA; decoding and the
    "xla" reference); a tuple (segment_ids, branch_ids, one_segment_per_row): the fused layout
    attention of models/attention.py with `implementation` (already resolved, never "auto")."""
    if isinstance(layout, tuple):
        seg, br, one = layout
        return attn_lib.layout_attention(q, k, v, seg, br, implementation, one)
    if layout is None:
        if implementation in ("splash", "splash_interpret"):
            return attn_lib.causal_segments(q, k, v, None, implementation, True)
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    return jax.nn.dot_product_attention(q, k, v, mask=layout, implementation="xla")


def resolve_attention(implementation: str, dtype: Any) -> str:
    """"auto": TPU -> splash (inside the train step's kernel mesh); GPU in 16-bit -> cudnn (fused where
    exact, see attention.py); else "xla" (the masked reference, CPU default)."""
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu" and attn_lib.in_kernel_mesh():
        # the train step; elsewhere (decoding, scoring arrays of any sharding) XLA partitions attention
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def _activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, dtype):
        D, M = cfg.hidden_size, cfg.intermediate_size
        self.dtype, self.activation = dtype, cfg.activation
        self.w_gate = _param(rngs, (D, M), ("embed", "mlp"), param_dtype, "normal") if cfg.gated_mlp else None
        self.w_up = _param(rngs, (D, M), ("embed", "mlp"), param_dtype, "normal")
        self.w_down = _param(rngs, (M, D), ("mlp", "embed"), param_dtype, "normal")
        self.b_up = _param(None, (M,), ("mlp",), param_dtype, "zeros") if cfg.mlp_bias else None
        self.b_gate = (
            _param(None, (M,), ("mlp",), param_dtype, "zeros") if cfg.mlp_bias and cfg.gated_mlp else None
        )
        self.b_down = _param(None, (D,), ("embed",), param_dtype, "zeros") if cfg.mlp_bias else None

    def _dense(self, x: Array, w: nnx.Param, b: nnx.Param | None) -> Array:
        y = x @ w[...].astype(self.dtype)
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x: Array) -> Array:
        if self.w_gate is None:  # act(x W_up) W_down
            h = _activation(self.activation, self._dense(x, self.w_up, self.b_up))
        else:  # SwiGLU: (act(x W_gate) * x W_up) W_down
            h = _activation(self.activation, self._dense(x, self.w_gate, self.b_gate))
            h = h * self._dense(x, self.w_up, self.b_up)
        return self._dense(h, self.w_down, self.b_down)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, dtype, implementation: str):
        self.parallel = cfg.parallel_residual
        self.ln1 = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.attn = Attention(
            cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, implementation=implementation
        )
        self.ln2 = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)

    def __call__(self, x, rope, mask, kv=None, index=None):
        a, kv = self.attn(self.ln1(x), rope, mask, kv, index)
        if self.parallel:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.ln2(x)), kv
        x = x + a
        return x + self.mlp(self.ln2(x)), kv


def stack_blocks(blocks: list[Block]) -> Block:
    """One Block whose parameters hold those of `blocks` stacked on a leading layer axis (logical
    name "layers"), for a lax.scan over layers. Each layer is built (and randomly initialised) on its
    own first, in order, so the values equal those of a per-layer list."""
    stacked = blocks[0]
    layers = [dict(nnx.iter_graph(b)) for b in blocks]
    for path, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable):
            var.set_value(jnp.stack([layer[path][...] for layer in layers]))
            names = var.get_metadata().get("out_sharding")
            if names is not None:
                var.set_metadata(out_sharding=("layers", *names))
    return stacked


def _remat_policy(name: str):
    return {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[name]


class Decoder(nnx.Module):
    """Decoder-only transformer; `cfg.family` picks the block shape (see module docstring).

    dtype: compute dtype (default bfloat16 on accelerators, float32 on CPU); param_dtype: storage.
    attention: "auto" (TPU: Pallas splash; GPU in 16-bit: cuDNN where exact; else XLA) | "xla" (masked
    reference) | "cudnn" | "splash" | "splash_interpret" (the Pallas kernel interpreted, for CPU tests).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        attention: str = "auto",
    ):
        if attention not in attn_lib.IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {attn_lib.IMPLEMENTATIONS}, got {attention!r}")
        dtype = jnp.dtype(dtype) if dtype is not None else default_dtype()
        self.cfg, self.dtype, self.attention = cfg, dtype, attention
        D, V = cfg.hidden_size, cfg.vocab_size
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), param_dtype, "normal")
        self.pos_embed = (
            _param(rngs, (cfg.max_position_embeddings, D), (None, "embed"), param_dtype, "normal")
            if cfg.learned_positions
            else None
        )
        self.blocks = stack_blocks(
            [
                Block(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, implementation=attention)
                for _ in range(cfg.num_layers)
            ]
        )
        self.final_norm = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(rngs, (D, V), ("embed", "vocab"), param_dtype, "normal")
        )

    # -- pieces shared by the full forward and decoding

    def _embed(self, tokens: Array, positions: Array) -> tuple[Array, tuple[Array, Array] | None]:
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0, mode="clip").astype(self.dtype)
            return x, None
        return x, rope_cos_sin(positions, rope_inv_freq(self.cfg))

    def unembedding(self) -> tuple[Array, Array | None]:
        """(unembed_DV, bias_V or None) in the compute dtype: logits = hidden @ unembed_DV."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype), None

    def _logits(self, hidden: Array) -> Array:
        w, _ = self.unembedding()
        # float32 logits: bfloat16 has ~3 significant digits, too few for log-probs.
        return jnp.einsum("nsd,dv->nsv", hidden, w, preferred_element_type=jnp.float32)

    def _run_blocks(self, x: Array, rope, mask) -> Array:
        """All layers by one lax.scan over the stacked block parameters (one compiled layer body)."""
        graphdef, state = nnx.split(self.blocks)

        def body(x, layer_state):
            return nnx.merge(graphdef, layer_state)(x, rope, mask)[0], None

        if self.cfg.remat != "none":  # recompute each layer in the backward pass (policy: what to keep)
            body = jax.checkpoint(body, policy=_remat_policy(self.cfg.remat))
        x, _ = jax.lax.scan(body, x, state)
        return x

    # -- public API (CONTRACTS §3)

    def __call__(
        self,
        tokens: Array,
        positions: Array,
        segment_ids: Array | None = None,
        branch_ids: Array | None = None,
        return_hidden: bool = False,
        one_segment_per_row: bool = False,
    ) -> Array:
        """Logits [N, S, V] (float32), or the final hidden states [N, S, D] after the final norm.

        one_segment_per_row: each row holds one right-padded segment (prefix-shared rows), which lets
        the GPU take cuDNN's causal kernel for the layout (models/attention.py)."""
        if segment_ids is None and branch_ids is not None:
            segment_ids = jnp.ones_like(branch_ids)
        impl = resolve_attention(self.attention, self.dtype)
        if segment_ids is None:
            mask = None
        elif impl == "xla" or (impl == "cudnn" and not one_segment_per_row):
            # the reference (and GPU rows of several segments, which cuDNN here cannot take): one
            # explicit [N, 1, S, S] mask shared by all layers
            mask = attention_mask(segment_ids, branch_ids)
        else:
            mask = (segment_ids, branch_ids, one_segment_per_row)
        x, rope = self._embed(tokens, positions)
        x = self._run_blocks(x, rope, mask)
        x = self.final_norm(x)
        return x if return_hidden else self._logits(x)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        """Empty KV cache: keys/values of all layers [L, B, max_len, K, F], `valid` [B, max_len]
        (slots holding real tokens) and the shared write `index`."""
        dtype = jnp.dtype(dtype) if dtype is not None else self.dtype
        shape = (self.cfg.num_layers, batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        return {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool),
            "index": jnp.zeros((), jnp.int32),
        }

    def decode(
        self, tokens_BT: Array, positions_BT: Array, cache: Cache, mask_BT: Array | None = None
    ) -> tuple[Array, Cache]:
        """Prefill (T > 1) or one step (T = 1): writes T slots at cache["index"] for every row.

        Padding (left or right) is marked by mask_BT (1 = real token, default all real): masked
        slots are never attended to. Positions are explicit, so after a right-padded prefill each row
        continues at its own length while all rows share the write index.
        Returns float32 logits [B, T, V] and the updated cache.
        """
        B, T = tokens_BT.shape
        index = cache["index"]
        real = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, index))
        S = valid.shape[1]
        q_slot = index + jnp.arange(T)
        k_slot = jnp.arange(S)
        mask = valid[:, None, :] & (k_slot[None, None, :] <= q_slot[None, :, None])
        mask |= k_slot[None, None, :] == q_slot[None, :, None]  # no empty softmax row for padding
        mask = mask[:, None]
        x, rope = self._embed(tokens_BT, positions_BT)
        graphdef, state = nnx.split(self.blocks)

        def body(x, layer):
            layer_state, k, v = layer
            x, kv = nnx.merge(graphdef, layer_state)(x, rope, mask, (k, v), index)
            return x, kv

        x, (ks, vs) = jax.lax.scan(body, x, (state, cache["k"], cache["v"]))
        logits = self._logits(self.final_norm(x))
        return logits, {"k": ks, "v": vs, "valid": valid, "index": index + T}
