"""Params-only orbax checkpoints of a Decoder, and the train-checkpoint layout `dpoq convert` reads.

save_params(PATH, ...) writes
  PATH/params/             orbax StandardCheckpointer item: the nnx.Param state as a plain nested dict
  PATH/model_config.json   ModelConfig.to_dict()
Training runs store the same `params` item beside a JSON item `model_config` in each step directory
(WORKDIR/checkpoints/<step>/params, .../<step>/model_config/metadata); runs are read through
train/load.py (integrity checks, LoRA), which uses this module for the params layout.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from dpoq_jax import paths
from dpoq_jax.models.decoder import Decoder
from dpoq_jax.models.model_config import ModelConfig


def save_params(path: str, model_or_state: Decoder | nnx.State, cfg: ModelConfig) -> None:
    """Write the parameters (orbax, item `params`) and model_config.json under `path` (created)."""
    state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) else model_or_state
    path = paths.absolute(path)
    paths.makedirs(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(paths.join(path, "params"), nnx.to_pure_dict(state))
        ckptr.wait_until_finished()
    paths.write_text(paths.join(path, "model_config.json"), json.dumps(cfg.to_dict(), indent=2))


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


def read_params(path: str, cfg: ModelConfig, abs_params: nnx.State, shardings: Any) -> nnx.State:
    """The parameters of save_params' directory (or a step directory holding `params`) in the layout of
    `abs_params` (the abstract parameters of Decoder(cfg)), restored straight into `shardings` (in the
    tree of `abs_params`). Build models with `dpoq_jax.train.load.load_model`, which calls this."""
    target = nnx.to_pure_dict(
        jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shardings)
    )
    with ocp.StandardCheckpointer() as ckptr:
        try:
            pure = ckptr.restore(paths.join(path, "params"), target)
        except (ValueError, KeyError) as e:
            raise ValueError(f"{path}/params does not match model_config ({cfg.family}): {e}") from e
    params = jax.tree.map(lambda x: x, abs_params)
    nnx.replace_by_pure_dict(params, pure)
    return params
