"""Train state and its creation directly in its sharded layout (no full unsharded copy is built)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from dpoq_jax.train.mesh import replicated


@struct.dataclass
class TrainState:
    """step: updates attempted; params: policy nnx.State (nnx.Param leaves); opt_state: optax state;
    ref_params: frozen reference parameters (maybe bfloat16) or None when the reference log-probs
    are precomputed (or for SFT); skipped: non-finite steps skipped in total; nonfinite_streak: in a
    row. The data position (LoaderState) is host-side JSON, checkpointed beside this."""

    step: jax.Array
    params: Any
    opt_state: Any
    ref_params: Any
    skipped: jax.Array
    nonfinite_streak: jax.Array


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef, parameters, everything else (buffers such as rotary tables)."""
    return nnx.split(model, nnx.Param, ...)


def param_shardings(abs_params: nnx.State, mesh: Mesh, rules: Any) -> Any:
    """NamedShardings for the parameters from their logical axis metadata, with the tree structure of
    `abs_params` (so they pair leaf for leaf with params, gradients and optimizer moments)."""
    from dpoq_jax.models.sharding import logical_to_shardings

    shardings = logical_to_shardings(abs_params, mesh, rules)
    leaves = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    return jax.tree.unflatten(jax.tree.structure(abs_params), leaves)


def abstract_model(make_model: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """graphdef, abstract params and abstract rest of `make_model()` without allocating anything."""
    with nnx.use_eager_sharding(False):
        return split_model(nnx.eval_shape(make_model))


def init_params(make_model: Callable[[], nnx.Module], shardings: Any) -> tuple[nnx.State, nnx.State]:
    """Random-init parameters created inside jit straight into `shardings` (plus the replicated rest)."""

    def init():
        with nnx.use_eager_sharding(False):
            _, params, rest = split_model(make_model())
        return params, rest

    return jax.jit(init, out_shardings=(shardings, None))()


def state_shardings(
    abs_params: Any, p_shardings: Any, optimizer: optax.GradientTransformation, mesh: Mesh, with_ref: bool
) -> TrainState:
    """Shardings of every TrainState leaf: optimizer moments like their parameters, counters replicated."""
    abs_opt = jax.eval_shape(optimizer.init, abs_params)
    rep = replicated(mesh)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abs_opt, p_shardings, transform_non_params=lambda _: rep
    )
    return TrainState(
        step=rep,
        params=p_shardings,
        opt_state=opt_sh,
        ref_params=p_shardings if with_ref else None,
        skipped=rep,
        nonfinite_streak=rep,
    )


def abstract_state(
    abs_params: Any, optimizer: optax.GradientTransformation, with_ref: bool, ref_dtype: Any
) -> TrainState:
    """ShapeDtypeStructs of the TrainState (for restoring a checkpoint into the right layout)."""
    return jax.eval_shape(lambda p: _build(p, optimizer, with_ref, ref_dtype), abs_params)


def _build(
    params: Any, optimizer: optax.GradientTransformation, with_ref: bool, ref_dtype: Any
) -> TrainState:
    ref = None
    if with_ref:  # the reference starts as a frozen copy of the initial policy (the SFT model)
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
) -> TrainState:
    """TrainState from (already sharded) initial parameters; optimizer state and reference copy are
    created inside jit directly in `shardings`."""
    build = jax.jit(
        lambda p: _build(p, optimizer, with_ref, ref_dtype),
        in_shardings=(shardings.params,),
        out_shardings=shardings,
    )
    return build(params)
