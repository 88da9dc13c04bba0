"""The pieces of the decoder (models/decoder.py): parameter init with logical axis names, rotary
embeddings (plain, YaRN, per-layer-type bases), norms, attention (fused or masked, sliding windows,
soft-capping, KV-cache writes), MLPs, and the block that the decoder stacks on a leading layer axis.

Shapes: N rows (or B), S tokens per row, D width, H query heads, K key/value heads, F head dim,
M MLP width, V vocabulary, L layers.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpoq_jax.models import attention as attn_lib
from dpoq_jax.models import lora as lora_lib
from dpoq_jax.models.model_config import ModelConfig

Array = jax.Array

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
    placement on a mesh comes from `sharding.logical_to_shardings` (jit out_shardings, or load_model)."""
    if init == "normal":
        value = _normal(rngs.params(), shape, dtype)
    else:  # numpy constants: no per-shape compilation when built eagerly
        value = jnp.asarray(np.full(shape, 1 if init == "ones" else 0, jnp.dtype(dtype)))
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# ----------------------------------------------------------------------------------------------
# Attention layout and rotary embeddings (pure functions)


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Inverse frequencies [rotary_dim / 2] (float32), with linear, Llama-3 or YaRN scaling; local: the
    sliding layers' plain rope of base cfg.local_rope_theta (Gemma 3)."""
    r = cfg.rotary_dim
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, r, 2, dtype=np.float32) / r))
    p = dict(cfg.rope_scaling)
    if local:
        pass
    elif cfg.rope_type == "yarn":  # transformers' _compute_yarn_parameters
        factor, old_ctx = p.get("factor"), p["original_max_position_embeddings"]
        factor = cfg.max_position_embeddings / old_ctx if factor is None else factor

        def dim_of(rotations: float) -> float:
            return r * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_of(p.get("beta_fast") or 32), dim_of(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, r - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(r // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolate = 1 - ramp
        inv = inv / factor * (1 - extrapolate) + inv * extrapolate
    elif cfg.rope_type == "linear":
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


def rope_attention_factor(cfg: ModelConfig) -> float:
    """YaRN's scale of cos and sin (1 for the other rope types)."""
    if cfg.rope_type != "yarn":
        return 1.0
    p = dict(cfg.rope_scaling)
    factor = p.get("factor") or cfg.max_position_embeddings / p["original_max_position_embeddings"]
    if p.get("attention_factor") is not None:
        return float(p["attention_factor"])

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if p.get("mscale") and p.get("mscale_all_dim"):
        return mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    return mscale(factor)


def rope_cos_sin(positions: Array, inv_freq: np.ndarray, scale: float = 1.0) -> tuple[Array, Array]:
    """cos, sin [N, S, 1, rotary_dim] (float32) for the given position ids, times `scale` (YaRN)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


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
    """LayerNorm or RMSNorm over the last axis (hidden_size, or head_dim for q/k norms). Gemma's RMS
    norms multiply by (1 + scale), its parameter starting at 0."""

    def __init__(self, cfg: ModelConfig, *, param_dtype, dtype, axis: str = "embed"):
        size = cfg.head_dim if axis == "head_dim" else cfg.hidden_size
        self.rms = cfg.norm == "rmsnorm"
        self.plus_one = cfg.gemma
        self.eps = cfg.norm_eps
        self.dtype = dtype
        self.scale = _param(None, (size,), (axis,), param_dtype, "zeros" if self.plus_one else "ones")
        self.bias = None if self.rms else _param(None, (size,), (axis,), param_dtype, "zeros")

    def __call__(self, x: Array) -> Array:
        # Statistics in float32: bfloat16 means/variances over D lose several digits.
        x = x.astype(jnp.float32)
        if self.rms:
            y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        else:
            mean = jnp.mean(x, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + scale if self.plus_one else scale)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        implementation: str,
        lora: lora_lib.Maker | None = None,
    ):
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
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, param_dtype=param_dtype, dtype=dtype, axis="head_dim")
            self.k_norm = Norm(cfg, param_dtype=param_dtype, dtype=dtype, axis="head_dim")
        else:
            self.q_norm = self.k_norm = None
        self.scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        self.softcap, self.window = cfg.attn_softcap, cfg.sliding_window
        lora = lora or lora_lib.Maker(None)
        self.wq_lora, self.wk_lora = lora("q", self.wq, 1), lora("k", self.wk, 1)
        self.wv_lora, self.wo_lora = lora("v", self.wv, 1), lora("o", self.wo, 2)

    def _proj(self, x: Array, w: nnx.Param, b: nnx.Param | None, ad: lora_lib.Adapter | None) -> Array:
        y = jnp.einsum("nsd,dhf->nshf", x, w[...].astype(self.dtype))
        y = y if ad is None else y + ad(x)
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(
        self,
        x_NSD: Array,
        rope: tuple[Array, Array] | None,
        mask: attn_lib.Mask,
        kv: tuple[Array, Array] | None = None,
        index: Array | None = None,
        local: Array | None = None,
    ) -> tuple[Array, tuple[Array, Array] | None]:
        """local: this layer's sliding-window flag (traced, from the scan); a dense mask comes with the
        window already applied (Mask.for_layer), the fused paths pick the windowed kernel by lax.cond."""
        q = self._proj(x_NSD, self.wq, self.bq, self.wq_lora)
        k = self._proj(x_NSD, self.wk, self.bk, self.wk_lora)
        v = self._proj(x_NSD, self.wv, self.bv, self.wv_lora)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if kv is not None:  # decoding: write the new keys/values at `index`, attend over the cache
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
            kv = (k, v)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        impl = resolve_attention(self.implementation, self.dtype, self.softcap)
        attend = functools.partial(_attend, q, k, v, mask, impl, self.scale, self.softcap)
        if self.window is not None and local is not None and mask.fused:
            out = jax.lax.cond(local, lambda: attend(self.window), lambda: attend(None))
        else:
            out = attend(None)
        y = jnp.einsum("nshf,hfd->nsd", out, self.wo[...].astype(self.dtype))
        if self.wo_lora is not None:
            y = y + self.wo_lora(out)
        if self.bo is not None:
            y = y + self.bo[...].astype(self.dtype)
        return y, kv


def _attend(
    q: Array,
    k: Array,
    v: Array,
    mask: attn_lib.Mask,
    implementation: str,
    scale: float | None = None,
    softcap: float | None = None,
    window: int | None = None,
) -> Array:
    """The dense kind: explicit mask (XLA; decoding and the "xla" reference; any sliding window already
    in it). Otherwise the fused layout attention of models/attention.py with `implementation` (already
    resolved, never "auto"), `window` slots back at most when given."""
    if mask.fused:
        return attn_lib.layout_attention(
            q, k, v, mask.segment_ids, mask.branch_ids, implementation, mask.one_segment_per_row,
            scale, softcap, window,
        )
    if mask.causal:  # the training forward: by query blocks, no scores kept for the backward pass
        return attn_lib.blocked_causal_attention(q, k, v, mask.dense, scale, softcap)
    return attn_lib.dense_attention(q, k, v, mask.dense, scale, softcap)


def resolve_attention(implementation: str, dtype: Any, softcap: float | None = None) -> str:
    """ "auto": TPU -> splash (inside the train step's kernel mesh); GPU in 16-bit -> cudnn (fused where
    exact, see attention.py); else "xla" (the masked reference, CPU default). cuDNN has no score
    soft-capping: soft-capped models (Gemma 2) take the XLA path there, asked for or not."""
    if implementation == "cudnn" and softcap is not None:
        _warn_once("cuDNN attention has no soft-capping: this model's attention runs on the XLA path")
        return "xla"
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu" and attn_lib.in_kernel_mesh():
        # the train step; elsewhere (decoding, scoring arrays of any sharding) XLA partitions attention
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "xla" if softcap is not None else "cudnn"
    return "xla"


@functools.cache
def _warn_once(msg: str) -> None:
    logging.getLogger(__name__).warning(msg)


def _activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.gelu(x, approximate=name == "gelu_new")


class MLP(nnx.Module):
    def __init__(
        self, cfg: ModelConfig, *, rngs: nnx.Rngs, param_dtype, dtype, lora: lora_lib.Maker | None = None
    ):
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
        lora = lora or lora_lib.Maker(None)
        self.w_gate_lora = lora("gate", self.w_gate, 1)
        self.w_up_lora, self.w_down_lora = lora("up", self.w_up, 1), lora("down", self.w_down, 1)

    def _dense(self, x: Array, w: nnx.Param, b: nnx.Param | None, ad: lora_lib.Adapter | None) -> Array:
        y = x @ w[...].astype(self.dtype)
        y = y if ad is None else y + ad(x)
        return y if b is None else y + b[...].astype(self.dtype)

    def __call__(self, x: Array) -> Array:
        if self.w_gate is None:  # act(x W_up) W_down
            h = _activation(self.activation, self._dense(x, self.w_up, self.b_up, self.w_up_lora))
        else:  # SwiGLU: (act(x W_gate) * x W_up) W_down
            h = _activation(self.activation, self._dense(x, self.w_gate, self.b_gate, self.w_gate_lora))
            h = h * self._dense(x, self.w_up, self.b_up, self.w_up_lora)
        return self._dense(h, self.w_down, self.b_down, self.w_down_lora)


class Block(nnx.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        implementation: str,
        lora: lora_lib.Maker | None = None,
    ):
        self.parallel = cfg.parallel_residual
        self.ln1 = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.attn = Attention(
            cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, implementation=implementation, lora=lora
        )
        self.ln2 = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.mlp = MLP(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, lora=lora)
        # Gemma: norms on the attention and MLP outputs too, before the residual adds
        self.ln1_post = Norm(cfg, param_dtype=param_dtype, dtype=dtype) if cfg.gemma else None
        self.ln2_post = Norm(cfg, param_dtype=param_dtype, dtype=dtype) if cfg.gemma else None

    def __call__(self, x, rope, mask, kv=None, index=None, local=None):
        a, kv = self.attn(self.ln1(x), rope, mask, kv, index, local)
        if self.parallel:  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
            return x + a + self.mlp(self.ln2(x)), kv
        if self.ln1_post is not None:
            a = self.ln1_post(a)
        x = x + a
        m = self.mlp(self.ln2(x))
        if self.ln2_post is not None:
            m = self.ln2_post(m)
        return x + m, kv


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
