"""Logical axis names on parameters -> NamedShardings on a mesh, and the default logical -> mesh rules."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Mapping[str, Any] | Sequence[tuple[str, Any]]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axis (or tuple of axes, or None = replicated). FSDP shards the model width,
# tensor parallelism the heads, MLP hidden and vocabulary; layers (scan axis) stay whole. A run's
# config may replace them (`sharding.rules`, train/mesh.py).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was created with (None if it has none)."""
    meta = variable.get_metadata()
    names = meta.get("out_sharding", meta.get("sharding_names", meta.get("sharding")))
    return None if names is None else tuple(names)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for one array. A logical axis maps to its rule's mesh axis (or axes); it stays
    whole when it has no rule, when the mesh axis is already used by an earlier dim of this array,
    or when the dim is not divisible by the mesh axes' size (e.g. 1 kv head on 4 tensor shards)."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, size in zip(names, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes_t = () if axes is None else (tuple(axes) if isinstance(axes, (list, tuple)) else (axes,))
        n = 1
        for a in axes_t:
            n *= mesh.shape[a]
        if not axes_t or used & set(axes_t) or size % n:
            out.append(None)
            continue
        used |= set(axes_t)
        out.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    return P(*out)


def logical_to_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedSharding per Variable of `abstract_state` (an nnx.State of arrays or ShapeDtypeStructs),
    same tree structure with the Variables replaced by shardings; unnamed ones are replicated."""

    def one(v: Any) -> NamedSharding:
        shape = v.get_value().shape if isinstance(v, nnx.Variable) else v.shape
        names = logical_names(v) if isinstance(v, nnx.Variable) else None
        if names is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(names, shape, mesh, rules))

    return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
