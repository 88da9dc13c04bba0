"""One Flax NNX decoder for GPT-NeoX/Pythia, Llama/Mistral, Qwen2/3, Gemma 2/3 and GPT-2 (ModelConfig.family).

Shapes: N rows (or B), S tokens per row (T new tokens when decoding), D width, H query heads,
K key/value heads, F head dim, M MLP width, V vocabulary, L layers. The layers' parameters are
stacked on a leading L axis (`Decoder.blocks` is one Block holding all of them) and run by a
lax.scan, so a model compiles one layer body however deep it is. Attention layout (CONTRACTS §3): token i
attends token j iff j <= i in row order, segment_ids equal and non-zero, and branch_ids[j] is 0 or
equals branch_ids[i]. segment_ids=None means plain causal attention over the whole row.
Layers of two kinds (full / sliding-window attention, each with its own rope base in Gemma 3) stay
under the one scan: a per-layer flag rides along with the stacked parameters and picks the mask and
rope inside the body.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpoq_jax.models import attention as attn_lib
from dpoq_jax.models import lora as lora_lib
from dpoq_jax.models.attention import layout_mask as attention_mask  # noqa: F401 (public name)
from dpoq_jax.models.layers import (
    Block,
    Norm,
    _param,
    _remat_policy,
    default_dtype,
    resolve_attention,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    stack_blocks,
)
from dpoq_jax.models.model_config import ModelConfig

Array = jax.Array
Cache = dict[str, Any]


class Decoder(nnx.Module):
    """Decoder-only transformer; `cfg.family` picks the block shape (see module docstring).

    dtype: compute dtype (default bfloat16 on accelerators, float32 on CPU); param_dtype: storage.
    attention: "auto" (TPU: Pallas splash; GPU in 16-bit: cuDNN where exact; else XLA) | "xla" (masked
    reference) | "cudnn" | "splash" | "splash_interpret" (the Pallas kernel interpreted, for CPU tests).
    lora: LoRA adapters on the chosen projections (models/lora.py; nnx.LoRAParam leaves), None: none.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        attention: str = "auto",
        lora: lora_lib.LoraConfig | None = None,
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
        maker = lora_lib.Maker(lora)
        kw = dict(param_dtype=param_dtype, dtype=dtype, implementation=attention, lora=maker)
        self.blocks = stack_blocks([Block(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.final_norm = Norm(cfg, param_dtype=param_dtype, dtype=dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else _param(rngs, (D, V), ("embed", "vocab"), param_dtype, "normal")
        )

    # -- pieces shared by the full forward and decoding

    def _embed(self, tokens: Array, positions: Array) -> tuple[Array, Any]:
        """Embeddings and rope: (cos, sin), or (global, local) pairs when the sliding layers have their
        own base (Gemma 3), or None (learned positions)."""
        embed = self.embed[...]
        x = jnp.take(embed, tokens, axis=0)
        if self.cfg.gemma:  # scaled by sqrt(D), the scale rounded to the table's dtype as transformers does
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, embed.dtype)
        x = x.astype(self.dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0, mode="clip").astype(self.dtype)
            return x, None
        rope = rope_cos_sin(positions, rope_inv_freq(self.cfg), rope_attention_factor(self.cfg))
        if self.cfg.local_rope_theta is None:
            return x, rope
        return x, (rope, rope_cos_sin(positions, rope_inv_freq(self.cfg, local=True)))

    def _layer_inputs(self, rope: Any, mask: attn_lib.Mask) -> Any:
        """fn(local) -> (rope, mask) of one layer inside the scan (local: its traced sliding flag)."""
        two_ropes = self.cfg.local_rope_theta is not None

        def pick(local):
            r = jax.tree.map(lambda g, l: jnp.where(local, l, g), *rope) if two_ropes else rope
            return r, mask.for_layer(local)

        return pick

    def unembedding(self) -> Array:
        """unembed_DV in the compute dtype: logits = hidden @ unembed_DV (no family has a bias)."""
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return w.astype(self.dtype)

    def _logits(self, hidden: Array) -> Array:
        w = self.unembedding()
        # float32 logits: bfloat16 has ~3 significant digits, too few for log-probs.
        logits = jnp.einsum("nsd,dv->nsv", hidden, w, preferred_element_type=jnp.float32)
        c = self.cfg.final_softcap
        return logits if c is None else c * jnp.tanh(logits / c)

    def _run_blocks(self, x: Array, rope, mask) -> Array:
        """All layers by one lax.scan over the stacked block parameters (one compiled layer body) and
        each layer's sliding-window flag."""
        graphdef, state = nnx.split(self.blocks)
        pick = self._layer_inputs(rope, mask)

        def body(x, layer):
            layer_state, local = layer
            return nnx.merge(graphdef, layer_state)(x, *pick(local), local=local)[0], None

        if self.cfg.remat != "none":  # recompute each layer in the backward pass (policy: what to keep)
            body = jax.checkpoint(body, policy=_remat_policy(self.cfg.remat))
        x, _ = jax.lax.scan(body, x, (state, jnp.asarray(self.cfg.local_layers())))
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
        cfg = self.cfg
        impl = resolve_attention(self.attention, self.dtype, cfg.attn_softcap)
        windowed = "sliding_attention" in cfg.layer_types
        if segment_ids is None and impl == "xla" and (windowed or cfg.attn_softcap is not None):
            segment_ids = jnp.ones(tokens.shape, jnp.int32)  # the explicit-mask path below
        if segment_ids is None:
            mask = attn_lib.Mask()  # plain causal rows
        elif impl == "xla" or (impl == "cudnn" and not one_segment_per_row):
            # the reference (and GPU rows of several segments, which cuDNN here cannot take): one
            # explicit [N, 1, S, S] mask shared by all layers, and its windowed twin when layers slide
            dense = attention_mask(segment_ids, branch_ids)
            win = dense & attn_lib.window_mask(positions, positions, cfg.sliding_window) if windowed else None
            mask = attn_lib.Mask(dense=dense, windowed=win, causal=True)
        else:
            mask = attn_lib.Mask(segment_ids, branch_ids, one_segment_per_row)
        x, rope = self._embed(tokens, positions)
        x = self._run_blocks(x, rope, mask)
        x = self.final_norm(x)
        return x if return_hidden else self._logits(x)

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Cache:
        """Empty KV cache: keys/values of all layers [L, B, max_len, K, F], `valid` [B, max_len]
        (slots holding real tokens) and the shared write `index`."""
        dtype = jnp.dtype(dtype) if dtype is not None else self.dtype
        shape = (self.cfg.num_layers, batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        cache = {
            "k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool),
            "index": jnp.zeros((), jnp.int32),
        }
        if "sliding_attention" in self.cfg.layer_types:  # the window counts positions: keep the keys'
            cache["pos"] = jnp.zeros((batch, max_len), jnp.int32)
        return cache

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
        dense = mask[:, None]
        out = {"valid": valid, "index": index + T}
        win = None
        if "pos" in cache:  # and its windowed twin; the window counts positions, not slots
            k_pos = jax.lax.dynamic_update_slice(cache["pos"], positions_BT.astype(jnp.int32), (0, index))
            out["pos"] = k_pos
            win = dense & attn_lib.window_mask(positions_BT, k_pos, self.cfg.sliding_window)
        mask = attn_lib.Mask(dense=dense, windowed=win)
        x, rope = self._embed(tokens_BT, positions_BT)
        graphdef, state = nnx.split(self.blocks)
        pick = self._layer_inputs(rope, mask)

        def body(x, layer):
            layer_state, k, v, local = layer
            x, kv = nnx.merge(graphdef, layer_state)(x, *pick(local), (k, v), index, local)
            return x, kv

        local_L = jnp.asarray(self.cfg.local_layers())
        x, (ks, vs) = jax.lax.scan(body, x, (state, cache["k"], cache["v"], local_L))
        logits = self._logits(self.final_norm(x))
        return logits, {"k": ks, "v": vs, **out}


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef, parameters, everything else (buffers such as rotary tables)."""
    return nnx.split(model, nnx.Param, ...)


def abstract_split(make_model: Any) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """split_params of `make_model()` as ShapeDtypeStructs (with their logical axis metadata):
    shapes and shardings are derived from it, and nothing is allocated."""
    with nnx.use_eager_sharding(False):
        return split_params(nnx.eval_shape(make_model))
