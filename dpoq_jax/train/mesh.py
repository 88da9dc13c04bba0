"""Device mesh (data, fsdp, tensor) and the run config's logical-axis -> mesh-axis rules.

Parameters carry logical axis names (CONTRACTS §3); rules (models/sharding.DEFAULT_RULES, overridable
in the config as `sharding.rules`) map them to mesh axes. Batches are split over data x fsdp along
their batch axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpoq_jax.models.sharding import BATCH_AXES, DEFAULT_RULES, MESH_AXES  # noqa: F401 (re-exported)


def mesh_shape(requested: dict[str, int] | Any, num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one entry may be -1 = whatever is left of the devices."""
    sizes = [int(requested[a]) for a in MESH_AXES]
    named = lambda: dict(zip(MESH_AXES, sizes, strict=True))  # noqa: E731
    free = [i for i, s in enumerate(sizes) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {named()}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {named()}")
    known = math.prod(s for s in sizes if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices cannot be split as {named()}")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh: {named()} needs {math.prod(sizes)} devices, there are {num_devices}")
    return tuple(sizes)


def make_mesh(requested: dict[str, int] | Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor) over all (or the given) devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(requested, len(devices))
    # Auto axes: XLA propagates shardings through the step (gathers by flat row index included).
    auto = (AxisType.Auto,) * len(MESH_AXES)
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalise config rules ([logical, mesh-axis | [axes] | None] pairs) to hashable tuples."""
    if not rules:
        return DEFAULT_RULES
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2:
            raise ValueError(f"sharding.rules[{i}] must be (logical_name, mesh_axes), got {rule!r}")
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad:
            raise ValueError(
                f"sharding.rules[{i}] ({name!r}) names unknown mesh axes {bad}; known {MESH_AXES}"
            )
        out.append((str(name), axes))
    return tuple(out)


def batch_sharding(mesh: Mesh, ndim: int, leading_micro_axis: bool = True) -> NamedSharding:
    """Sharding of a batch array: its batch axis (after the micro-batch axis) over data x fsdp."""
    spec = [None] * ndim
    spec[1 if leading_micro_axis else 0] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
