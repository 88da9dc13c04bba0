"""LoRA adapters on the decoder's projections: W x + (alpha / r) B(A x), with B = 0 at the start.

Why our own small module and not `nnx.LoRA` / `nnx.LoRALinear`: those wrap one 2-D `Linear`
(kernel [in, out]); our projections are einsum weights with head axes ([D, H, F], [H, F, D]) stacked
on a leading layer axis and run by one lax.scan. `Adapter` keeps those shapes (A [*in, r], B
[r, *out], one more leading L axis once stacked) and their logical axis names, so adapters shard by
the same rules as their projection. Its parameters are `nnx.LoRAParam` (a subclass of nnx.Param),
which is the one thing that tells adapters from base weights everywhere (`split_adapters`).

The reference model is the base with adapters off: `disable` zeroes the adapter tree, and
x W + s (x A) 0 equals x W exactly, so no second copy of the weights exists.
No dropout on adapters: the project trains without dropout (as the DPO reference code does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# our parameter holding each target: (module, weight name)
TARGET_WEIGHTS = {
    "q": ("attn", "wq"),
    "k": ("attn", "wk"),
    "v": ("attn", "wv"),
    "o": ("attn", "wo"),
    "gate": ("mlp", "w_gate"),
    "up": ("mlp", "w_up"),
    "down": ("mlp", "w_down"),
}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha (scale alpha / r, as PEFT without rsLoRA), targets (subset of TARGETS), seed of A."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"model.lora.rank must be >= 1 for LoRA, got {self.rank}")
        bad = sorted(set(self.targets) - set(TARGETS))
        if bad or not self.targets:
            raise ValueError(f"model.lora.targets: unknown {bad or 'empty'} (choose from {TARGETS})")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Adapter(nnx.Module):
    """delta(x) = scale * (x . A) . B for a projection x [..., *in] -> [..., *out]."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        in_names: tuple[str | None, ...],
        out_names: tuple[str | None, ...],
        cfg: LoraConfig,
        key: jax.Array,
        param_dtype: Any,
    ):
        r = cfg.rank
        # A: kaiming-uniform bound 1/sqrt(fan_in), as PEFT's default init; B: zeros (delta = 0 at start)
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(key, (*in_shape, r), param_dtype, -bound, bound)
        self.a = nnx.LoRAParam(a, out_sharding=(*in_names, None), eager_sharding=False)
        b = jnp.asarray(np.zeros((r, *out_shape), jnp.dtype(param_dtype)))
        self.b = nnx.LoRAParam(b, out_sharding=(None, *out_names), eager_sharding=False)
        self.n_in = len(in_shape)
        self.scale = cfg.scale

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        h = jnp.tensordot(x, self.a[...].astype(dtype), axes=self.n_in)
        return jnp.tensordot(h, (self.scale * self.b[...]).astype(dtype), axes=1)


class Maker:
    """Builds the adapters of one model (None when LoRA is off or a target is not chosen). Its own
    RNG stream draws A, so the base weights' random init is the same with or without LoRA. Adapters
    are float32 whatever the base's storage dtype (they are small; their updates need the digits)."""

    def __init__(self, cfg: LoraConfig | None, param_dtype: Any = jnp.float32):
        self.cfg, self.param_dtype = cfg, param_dtype
        self.rngs = nnx.Rngs(cfg.seed) if cfg is not None else None

    def __call__(self, target: str, weight: nnx.Param | None, n_in: int) -> Adapter | None:
        """The adapter of `target` on `weight`, whose first n_in axes are the inputs."""
        if self.cfg is None or weight is None or target not in self.cfg.targets:
            return None
        shape = weight.get_value().shape
        names = weight.get_metadata().get("out_sharding") or (None,) * len(shape)
        key = self.rngs.params()
        dt = self.param_dtype
        return Adapter(shape[:n_in], shape[n_in:], names[:n_in], names[n_in:], self.cfg, key, dt)


def split_adapters(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a parameter State."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def disable(adapters: Any) -> Any:
    """The adapter tree with every array zero: the model then computes exactly the base."""
    return jax.tree.map(jnp.zeros_like, adapters)


def merged_params(base: nnx.State, adapters: nnx.State, scale: float) -> nnx.State:
    """Base parameters with each adapted weight replaced by W + scale * A . B (stacked over layers)."""
    out = jax.tree.map(lambda x: x, base)
    flat_base = dict(nnx.to_flat_state(out))
    flat_ad = dict(nnx.to_flat_state(adapters))
    for path, a_var in flat_ad.items():
        if path[-1] != "a":
            continue
        owner = path[:-2]  # (..., "attn", "wq_lora", "a") -> adapter of (..., "attn", "wq")
        weight = path[-2].removesuffix("_lora")
        b = flat_ad[(*path[:-1], "b")][...]
        a = a_var[...]
        w_var = flat_base[(*owner, weight)]
        w = w_var[...]
        delta = jax.vmap(lambda a1, b1: jnp.tensordot(a1, b1, axes=1))(
            a.astype(jnp.float32), b.astype(jnp.float32)
        )
        w_var.set_value((w.astype(jnp.float32) + scale * delta).astype(w.dtype))
    return out


# ----------------------------------------------------------------------------------------------
# PEFT export: families whose projections are separate torch Linears (a fused QKV, as in GPT-NeoX
# and GPT-2, would need a rank-3r adapter; their LoRA runs export the merged model only).

PEFT_FAMILIES = ("llama", "qwen2")
_PEFT_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def peft_tensors(adapters: nnx.State, cfg: LoraConfig) -> dict[str, np.ndarray]:
    """PEFT's adapter_model.safetensors tensors: lora_A.weight [r, in], lora_B.weight [out, r] per layer.
    Our A [L, *in, r] and B [L, r, *out] flatten in the order of hf.py's weight layouts (head-major)."""
    pure = nnx.to_pure_dict(adapters)["blocks"]
    out = {}
    for target in cfg.targets:
        module, weight = TARGET_WEIGHTS[target]
        ad = pure[module].get(weight + "_lora")
        if ad is None:  # e.g. "gate" on a model without a gated MLP
            continue
        a, b = np.asarray(jax.device_get(ad["a"])), np.asarray(jax.device_get(ad["b"]))
        L, r = a.shape[0], a.shape[-1]
        for i in range(L):
            name = f"base_model.model.model.layers.{i}.{_PEFT_MODULES[target]}"
            out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].reshape(-1, r).T)
            out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, -1).T)
    return out
