"""Train state and its creation directly in its sharded layout (no full unsharded copy is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding

from dpoq_jax.models.decoder import split_params
from dpoq_jax.models.sharding import DEFAULT_RULES, logical_to_shardings
from dpoq_jax.train.mesh import replicated


@struct.dataclass
class TrainState:
    """step: updates attempted; params: policy nnx.State (nnx.Param leaves); opt_state: optax state;
    ref_params: frozen reference parameters (maybe bfloat16) or None when the reference log-probs
    are precomputed (or for SFT). With LoRA (models/lora.py) params holds only the adapters (so only
    they get gradients and optimizer state) and ref_params the frozen base: the policy is base +
    adapters, the reference the same base with adapters off (no second copy). skipped: non-finite
    steps skipped in total; nonfinite_streak: in a row. The data position (LoaderState) is host-side
    JSON, checkpointed beside this."""

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any
    skipped: jax.Array
    nonfinite_streak: jax.Array


def param_shardings(abs_params: nnx.State, mesh: Mesh | None, rules: Any = None) -> Any:
    """NamedShardings for the parameters from their logical axis metadata (`rules`, default
    DEFAULT_RULES) on `mesh`, or the first device for every leaf without a mesh; with the tree structure
    of `abs_params` (so they pair leaf for leaf with params, gradients and optimizer moments)."""
    if mesh is None:
        first = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda _: first, abs_params)
    shardings = logical_to_shardings(abs_params, mesh, rules or DEFAULT_RULES)
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return jax.tree.unflatten(jax.tree.structure(abs_params), leaves)


def init_params(
    make_model: Callable[[], nnx.Module], shardings: Any, adapters_only: bool = False
) -> Any:
    """Random-init parameters created inside jit straight into `shardings` (plus the replicated rest).
    adapters_only: just the LoRA adapters (XLA drops the unused base init), in their shardings."""

    def init():
        with nnx.use_eager_sharding(False):
            _, params, rest = split_params(make_model())
        if adapters_only:
            return nnx.split_state(params, nnx.LoRAParam, ...)[0]
        return params, rest

    if adapters_only:
        return jax.jit(init, out_shardings=nnx.split_state(shardings, nnx.LoRAParam, ...)[0])()
    return jax.jit(init, out_shardings=(shardings, None))()


def state_shardings(
    abs_params: Any,
    p_shardings: Any,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    with_ref: bool,
    base_shardings: Any = None,
) -> TrainState:
    """Shardings of every TrainState leaf: optimizer moments like their parameters, counters replicated.
    base_shardings: LoRA, those of the frozen base (held in ref_params)."""
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abs_opt, p_shardings, transform_non_params=lambda _: rep
    )
    return TrainState(
        step=rep,
        params=p_shardings,
        opt_state=opt_sh,
        ref_params=base_shardings if base_shardings is not None else (p_shardings if with_ref else None),
        skipped=rep,
        nonfinite_streak=rep,
    )


def abstract_state(
    abs_params: Any,
    optimizer: optax.GradientTransformation,
    with_ref: bool,
    ref_dtype: Any,
    abs_base: Any = None,
) -> TrainState:
    """ShapeDtypeStructs of the TrainState (for restoring a checkpoint into the right layout)."""
    return jax.eval_shape(lambda p, b: _build(p, optimizer, with_ref, ref_dtype, b), abs_params, abs_base)


def _build(
    params: Any, optimizer: optax.GradientTransformation, with_ref: bool, ref_dtype: Any, base: Any = None
) -> TrainState:
    ref = base  # LoRA: the frozen base, kept in its own dtype (the policy runs on it too)
    if with_ref and base is None:  # the reference: a frozen copy of the initial policy (the SFT model)
        ref = jax.tree.map(
            lambda x: x.astype(ref_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=optimizer.init(params),
        ref_params=ref,
        skipped=zero,
        nonfinite_streak=zero,
    )


def create_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    shardings: TrainState,
    *,
    with_ref: bool,
    ref_dtype: Any = jnp.float32,
    base: Any = None,
) -> TrainState:
    """TrainState from (already sharded) initial parameters (LoRA: the adapters, and the frozen `base`);
    optimizer state and reference copy are created inside jit directly in `shardings`."""
    build = jax.jit(
        lambda p, b: _build(p, optimizer, with_ref, ref_dtype, b),
        in_shardings=(shardings.params, shardings.ref_params if base is not None else None),
        out_shardings=shardings,
    )
    return build(params, base)
