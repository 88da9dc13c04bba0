"""Params-only orbax checkpoints of a Decoder, and the train-checkpoint layout `dpoq convert` reads.

save_params(PATH, ...) writes
  PATH/params/             orbax StandardCheckpointer item: the nnx.Param state as a plain nested dict
  PATH/model_config.json   ModelConfig.to_dict()
Training runs store the same `params` item beside a JSON item `model_config` in each step directory
(WORKDIR/checkpoints/<step>/params, .../<step>/model_config/metadata); load_params reads both, and
also a checkpoints directory or a workdir (taking the latest step unless `step` is given).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from dpoq_jax import paths
from dpoq_jax.models.config import ModelConfig
from dpoq_jax.models.decoder import Decoder
from dpoq_jax.models.sharding import Rules, logical_to_shardings


def save_params(path: str, model_or_state: Decoder | nnx.State, cfg: ModelConfig) -> None:
    """Write the parameters (orbax, item `params`) and model_config.json under `path` (created)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    path = paths.absolute(path)
    paths.makedirs(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(paths.join(path, "params"), nnx.to_pure_dict(state))
        ckptr.wait_until_finished()
    paths.write_text(paths.join(path, "model_config.json"), json.dumps(cfg.to_dict(), indent=2))


def refuse_lora_step(step_dir: str) -> None:
    """A LoRA run's step holds adapters, not a model: say so in one line instead of a shape error."""
    if paths.isdir(paths.join(step_dir, "base")):
        raise ValueError(
            f"{step_dir}: a LoRA checkpoint (adapters only, the base is elsewhere); use the run's merged "
            "export WORKDIR/hf, or resume the run itself"
        )


def _is_step_dir(path: str) -> bool:
    return paths.isdir(paths.join(path, "params")) and (
        paths.isfile(paths.join(path, "model_config.json"))
        or paths.isfile(paths.join(path, "model_config", "metadata"))
    )


def resolve_params_dir(path: str, step: int | None = None) -> str:
    """The directory holding `params` + model config: `path` itself, or a step of a checkpoints
    directory / workdir (`step`, default the latest)."""
    path = paths.absolute(path)
    if step is None and _is_step_dir(path):
        return path
    root = paths.join(path, "checkpoints") if paths.isdir(paths.join(path, "checkpoints")) else path
    steps = (
        sorted(int(d) for d in paths.listdir(root) if d.isdigit() and _is_step_dir(paths.join(root, d)))
        if (paths.isdir(root))
        else []
    )
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{root}: no checkpoint for step {step} (steps found: {steps})")
        return paths.join(root, str(step))
    if not steps:
        raise FileNotFoundError(
            f"{path}: not a params checkpoint (expected params/ with model_config.json, or a training "
            "checkpoints directory of <step>/params + <step>/model_config)"
        )
    return paths.join(root, str(steps[-1]))


def is_params_source(path: str) -> bool:
    """True when `path` holds params checkpoints (save_params' layout, a checkpoints directory or a
    workdir), i.e. `resolve_params_dir` finds a step in it."""
    try:
        resolve_params_dir(path)
    except FileNotFoundError:
        return False
    return True


def read_model_config(path: str) -> ModelConfig:
    for f in (paths.join(path, "model_config.json"), paths.join(path, "model_config", "metadata")):
        if paths.isfile(f):
            with paths.open(f) as fh:
                try:
                    return ModelConfig.from_dict(json.load(fh))
                except (ValueError, TypeError) as e:
                    raise ValueError(f"{f}: {e}") from e
    raise FileNotFoundError(f"{path}: no model_config.json or model_config/metadata")


def load_params(
    path: str,
    *,
    step: int | None = None,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    attention: str = "auto",
) -> tuple[Decoder, ModelConfig]:
    """(Decoder, ModelConfig) from save_params' directory or a training checkpoint; with a mesh the
    parameters are restored straight into their shardings."""
    path = resolve_params_dir(path, step)
    refuse_lora_step(path)
    cfg = read_model_config(path)
    from dpoq_jax.models.hf import abstract_decoder  # noqa: PLC0415 (hf imports this module's peers)

    graphdef, abs_params, rest = abstract_decoder(
        cfg, dtype=dtype, param_dtype=param_dtype, attention=attention
    )
    if mesh is not None:
        from dpoq_jax.train.mesh import DEFAULT_RULES  # noqa: PLC0415

        shardings = nnx.to_pure_dict(logical_to_shardings(abs_params, mesh, rules or DEFAULT_RULES))
    else:
        dev = SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: dev, nnx.to_pure_dict(abs_params))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        nnx.to_pure_dict(abs_params),
        shardings,
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            pure = ckptr.restore(paths.join(path, "params"), target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}/params does not match model_config ({cfg.family}): {e}") from e
    params = jax.tree.map(lambda x: x, abs_params)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest), cfg
